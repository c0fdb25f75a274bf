"""Report formats: one module per format, each behind the same two functions.

Every format module defines ``render_report(report, options) -> str`` (a probe's
results) and ``render_check(check, options) -> str`` (a baseline comparison). Adding a
format is one new module and one entry in ``_MODULES``. Nothing here imports torch;
rich, pandas and matplotlib are imported inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sfdiag.errors import SfdiagError
from sfdiag.report import csv as _csv
from sfdiag.report import json as _json
from sfdiag.report import junit as _junit
from sfdiag.report import markdown as _markdown
from sfdiag.report import table as _table
from sfdiag.report._options import RenderOptions

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.results import CheckResult, ProbeReport

__all__ = ["CHECK_FORMATS", "FORMATS", "RenderOptions", "render", "render_check"]

_MODULES = {
    "table": _table,
    "json": _json,
    "csv": _csv,
    "markdown": _markdown,
    "junit": _junit,
}

FORMATS: dict[str, Callable[[ProbeReport, RenderOptions], str]] = {
    name: module.render_report for name, module in _MODULES.items()
}
CHECK_FORMATS: dict[str, Callable[[CheckResult, RenderOptions], str]] = {
    name: module.render_check for name, module in _MODULES.items()
}


def _lookup(table: dict[str, Callable], fmt: str) -> Callable:
    try:
        return table[fmt]
    except (KeyError, TypeError):
        raise SfdiagError(f"unknown format {fmt!r}; choose one of: {', '.join(table)}") from None


def render(report: ProbeReport, fmt: str, options: RenderOptions = RenderOptions()) -> str:
    """The report in format ``fmt`` (a key of ``FORMATS``), ending with a newline."""
    return _lookup(FORMATS, fmt)(report, options)


def render_check(check: CheckResult, fmt: str, options: RenderOptions = RenderOptions()) -> str:
    """A baseline comparison in format ``fmt`` (a key of ``CHECK_FORMATS``)."""
    return _lookup(CHECK_FORMATS, fmt)(check, options)
