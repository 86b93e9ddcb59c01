"""Progress bars with rate and ETA for every long step (preprocessing, training, inference)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def progress_bar(
    description: str, total: int, unit: str = "it", enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """A context that yields ``advance(n)``; draws ``done/total``, rate in ``unit``/s, elapsed and ETA.

    Args:
        description: label on the left.
        total: number of units of work.
        unit: what one unit is called (shown in the rate).
        enabled: when False nothing is drawn (``advance`` is still callable).
    """
    if not enabled:
        yield lambda n=1: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=False,
    )
    task = progress.add_task(description, total=total, rate="")

    def advance(n: int = 1) -> None:
        progress.advance(task, n)
        speed = progress.tasks[0].speed
        if speed:
            progress.update(task, rate=f"{speed:,.1f} {unit}/s")

    with progress:
        yield advance
