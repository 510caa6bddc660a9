"""Progress bars for long work (rich), on stderr when it is a terminal.

``MARNET_PROGRESS=0`` turns them off; ``MARNET_PROGRESS=1`` turns them on even when stderr is
not a terminal (a log file, a CI job).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def enabled() -> bool:
    """Whether bars are shown: ``MARNET_PROGRESS`` (0 or 1) decides, else whether stderr is a
    terminal."""
    forced = os.environ.get("MARNET_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, info="")``; ``info`` is shown after the bar (timings, loss...)."""
    if not enabled():
        yield lambda n=1, info="": None
        return
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            bar.update(task, advance=n, **({"info": info} if info else {}))

        yield advance
