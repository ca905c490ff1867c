"""Progress bars for long work (training, calibration, evaluation), drawn with rich."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield `advance(**fields)`: one step forward, with fields shown beside the bar."""
    if not enabled:
        yield lambda **fields: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(**fields: object) -> None:
            progress.update(task, advance=1, info=" ".join(f"{k}={v}" for k, v in fields.items()))

        yield advance
