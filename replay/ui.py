"""Terminal output of the replay commands: progress bars and rates (rich, only on a
terminal), tables on a terminal, tab-separated text when piped, JSON lines on demand."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Meter:
    """Counts records and, on a terminal, shows a progress bar with the rate."""

    def __init__(self, description: str, *, enabled: bool) -> None:
        self.description = description
        self.enabled = enabled
        self.done = 0
        self.total: int | None = None
        self.started = time.monotonic()
        self._progress: Any = None
        self._task: Any = None

    @contextlib.contextmanager
    def shown(self) -> Iterator[Meter]:
        if not self.enabled:
            yield self
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
            TimeRemainingColumn(), console=Console(file=sys.stderr), transient=False)
        self._progress = progress
        self._task = progress.add_task(self.description, total=self.total, rate="")
        with progress:
            yield self
        self._progress = None

    def set_total(self, total: int) -> None:
        self.total = total
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def advance(self, n: int) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n,
                                  rate=f"{self.rate():,.0f} events/s")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        return self.done / max(self.elapsed(), 1e-9)


def json_line(obj: dict[str, Any], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(obj, separators=(",", ":")) + "\n")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
          out: TextIO | None = None, caption: str | None = None) -> None:
    """A rich table on a terminal, tab-separated lines (with a header) otherwise."""
    out = out or sys.stdout
    if is_tty(out):
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, caption=caption, show_lines=False)
        for col in columns:
            t.add_column(col, overflow="fold")
        for row in rows:
            t.add_row(*("" if v is None else str(v) for v in row))
        Console(file=out).print(t)
        return
    out.write("# " + title + (f" ({caption})" if caption else "") + "\n")
    out.write("\t".join(columns) + "\n")
    for row in rows:
        out.write("\t".join("" if v is None else str(v) for v in row) + "\n")
