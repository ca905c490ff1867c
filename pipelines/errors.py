"""The two kinds of failure the CLI tells apart: bad input (exit 2) and a stage failing (exit 1)."""


class RecipeError(Exception):
    """Bad input, found before anything is written: one line naming file, line and field."""


class StageError(Exception):
    """A stage failed at run time; the message names the stage."""
