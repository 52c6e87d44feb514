"""One progress bar for all long work (rich), silent when not wanted."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress(total: int, show: bool, label: str, rate_unit: str | None = None) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n, units=0)``; draws a bar on stderr when ``show`` is true.

    With ``rate_unit`` (e.g. ``"rows"``) the bar also shows how many units were counted
    through ``advance``'s ``units`` and how many per second.
    """
    if not show:
        yield lambda n, units=0: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = ["[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    if rate_unit:
        columns.append(TextColumn("{task.fields[rate]}"))
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, rate="")
        start, counted = time.monotonic(), 0

        def advance(n: int, units: int = 0) -> None:
            nonlocal counted
            counted += units
            fields = {}
            if rate_unit:
                per_second = counted / max(time.monotonic() - start, 1e-9)
                fields["rate"] = f"{counted:,} {rate_unit} · {per_second:,.1f} {rate_unit}/s"
            bar.update(task, advance=n, **fields)

        yield advance
