"""``--format json``: the schema of docs/contract.md, exactly ``report.to_dict()``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.report._options import RenderOptions
    from sfdiag.results import CheckResult, ProbeReport


def render_report(report: ProbeReport, options: RenderOptions) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"


def render_check(check: CheckResult, options: RenderOptions) -> str:
    return json.dumps(check.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"
