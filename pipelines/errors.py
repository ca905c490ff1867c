"""The two kinds of failure the CLI tells apart: bad input (exit 2) and a stage failing (exit 1)."""

from pathlib import Path


class RecipeError(Exception):
    """Bad input, found before anything is written: one line naming file, line and field."""


class StageError(Exception):
    """A stage failed at run time; the message names the stage, `log_file` is the run's log (the traceback)."""

    def __init__(self, message: str, log_file: Path | None = None):
        super().__init__(message)
        self.log_file = log_file
