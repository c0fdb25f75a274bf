"""``--format csv``: one row per optimizer, for spreadsheets and ``pandas.read_csv``.

Numbers stay numbers (nan / inf written as ``nan`` / ``inf``, which read_csv parses);
a missing text field (no fingerprint, no error) is an empty cell.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.report._options import RenderOptions
    from sfdiag.results import CheckResult, ProbeReport

REPORT_COLUMNS = (
    "optimizer",
    "class",
    "flagged",
    "verdict",
    "fingerprint",
    "pre_step_grad_norm",
    "post_step_grad_norm",
    "norm_ratio",
    "params_mutated",
    "params_with_grad",
    "state_bytes_per_element",
    "advice",
    "error",
)
CHECK_COLUMNS = (
    "optimizer",
    "kind",
    "what",
    "step",
    "baseline",
    "current",
    "change",
    "allowed",
    "regression",
)
_TEXT = {"optimizer", "class", "verdict", "fingerprint", "advice", "error", "kind", "what"}


def _to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(columns))
    for name in columns:
        if name in _TEXT:
            frame[name] = frame[name].fillna("")
    return frame.to_csv(index=False, lineterminator="\n", na_rep="nan")


def _float(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def render_report(report: ProbeReport, options: RenderOptions) -> str:
    rows = [
        {
            "optimizer": r.optimizer,
            "class": r.cls,
            "flagged": r.flagged,
            "verdict": r.verdict,
            "fingerprint": r.fingerprint,
            "pre_step_grad_norm": _float(r.pre_step_grad_norm),
            "post_step_grad_norm": _float(r.post_step_grad_norm),
            "norm_ratio": _float(r.norm_ratio),
            "params_mutated": r.params_mutated,
            "params_with_grad": r.params_with_grad,
            "state_bytes_per_element": _float(r.state_bytes_per_element),
            "advice": r.advice,
            "error": r.error,
        }
        for r in report.results
    ]
    return _to_csv(rows, REPORT_COLUMNS)


def render_check(check: CheckResult, options: RenderOptions) -> str:
    from sfdiag.report._text import fmt_num, fmt_value

    def cell(value: Any) -> Any:
        # Mixed columns (a norm here, a class name there): None is an empty cell,
        # numbers stay numbers, anything else is its one-line text.
        if value is None:
            return ""
        if isinstance(value, float):
            return value if math.isfinite(value) else fmt_num(value)
        if isinstance(value, (bool, int, str)):
            return value
        return fmt_value(value, limit=10_000)

    rows = [
        {
            "optimizer": cell(d.optimizer),
            "kind": d.kind,
            "what": d.what,
            "step": cell(d.step),
            "baseline": cell(d.baseline_value),
            "current": cell(d.current_value),
            "change": cell(d.change),
            "allowed": cell(d.allowed),
            "regression": d.regression,
        }
        for d in check.differences
    ]
    return _to_csv(rows, CHECK_COLUMNS)
