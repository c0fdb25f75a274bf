"""The options every format accepts (most formats ignore most of them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RenderOptions:
    color: bool = False  # ANSI styles (table only); the CLI decides from the terminal / NO_COLOR
    width: int | None = None  # table width in columns; None = 120
    per_param: bool = False  # also one table per optimizer from ``result.params``
