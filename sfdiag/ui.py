"""Terminal edges: colour decisions, notes and the progress bar, all on stderr."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO


def wants_color(stream: IO[str]) -> bool:
    """ANSI colour only for a terminal, and never with NO_COLOR set or TERM=dumb."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def note(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def error(message: str) -> None:
    print(f"sfdiag: error: {message}", file=sys.stderr)


@contextmanager
def progress_bar(total: int, *, quiet: bool) -> Iterator[object]:
    """A rich progress bar over optimizer x step on stderr; a no-op when quiet or not a TTY.

    Yields a callback ``(label, step, steps) -> None`` for the probe.
    """
    if quiet or not wants_color(sys.stderr):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("probing", total=total)

        def advance(label: str, step: int, steps: int) -> None:
            bar.update(task, advance=1, description=f"probing {label} ({step}/{steps})")

        yield advance
