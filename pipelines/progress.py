"""Progress bars for long work (training, calibration, evaluation), drawn with rich."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, file: IO[str] | None = None
                 ) -> Iterator[Callable[..., None]]:
    """Yield `advance(**fields)`: one step forward, with fields shown beside the bar. `file`: where
    to draw (default stdout), e.g. the terminal while the process's own output is redirected."""
    if not enabled:
        yield lambda **fields: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    console = Console(file=file) if file is not None else None
    with Progress(*columns, transient=False, console=console) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(**fields: object) -> None:
            progress.update(task, advance=1, info=" ".join(f"{k}={v}" for k, v in fields.items()))

        yield advance
