"""A report's tables as pandas DataFrames (``ProbeReport.to_pandas``).

One row per optimizer (``results``), per optimizer step (``steps``), per parameter
(``params``), per logged gradient metric (``metrics``) or per mode finding
(``findings``). Columns are the JSON report's keys (docs/contract.md), the optimizer's label
first where a row belongs to one; NaN and infinities stay floats. pandas is imported here,
when a frame is asked for, never on ``import sfdiag``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sfdiag.errors import SfdiagError

if TYPE_CHECKING:  # pragma: no cover
    import pandas

    from sfdiag.results import ProbeReport

KINDS = ("results", "steps", "params", "metrics", "findings")

_RESULT_COLUMNS = (
    "optimizer",
    "class",
    "verdict",
    "flagged",
    "fingerprint",
    "pre_step_grad_norm",
    "post_step_grad_norm",
    "norm_ratio",
    "params_mutated",
    "params_with_grad",
    "state_bytes_per_element",
    "undetermined",
    "advice",
    "error",
)


def _rows(report: ProbeReport, kind: str) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    if kind == "results":
        rows = []
        for r in report.results:
            row = {
                "optimizer": r.optimizer,
                "class": r.cls,
                "verdict": r.verdict,
                "flagged": r.flagged,
                "fingerprint": r.fingerprint,
                "pre_step_grad_norm": r.pre_step_grad_norm,
                "post_step_grad_norm": r.post_step_grad_norm,
                "norm_ratio": r.norm_ratio,
                "params_mutated": r.params_mutated,
                "params_with_grad": r.params_with_grad,
                "state_bytes_per_element": r.state_bytes_per_element,
                "undetermined": r.undetermined,
                "advice": r.advice,
                "error": r.error,
            }
            rows.append(row)
        return rows, _RESULT_COLUMNS
    if kind == "steps":
        columns = ("optimizer", "step", "loss", "pre_step_grad_norm", "post_step_grad_norm",
                   "ratio", "params_mutated")  # fmt: skip
        rows = [
            {
                "optimizer": r.optimizer,
                "step": s.step,
                "loss": s.loss,
                "pre_step_grad_norm": s.pre_step_grad_norm,
                "post_step_grad_norm": s.post_step_grad_norm,
                "ratio": s.ratio,
                "params_mutated": s.params_mutated,
            }
            for r in report.results
            for s in r.steps
        ]
        return rows, columns
    if kind == "params":
        columns = ("optimizer", "name", "shape", "verdict", "pre_step_grad_norm",
                   "post_step_grad_norm", "max_rel_change", "fingerprint")  # fmt: skip
        rows = [
            {
                "optimizer": r.optimizer,
                "name": p.name,
                "shape": tuple(p.shape),
                "verdict": p.verdict,
                "pre_step_grad_norm": p.pre_step_grad_norm,
                "post_step_grad_norm": p.post_step_grad_norm,
                "max_rel_change": p.max_rel_change,
                "fingerprint": p.fingerprint,
            }
            for r in report.results
            for p in r.params
        ]
        return rows, columns
    if kind == "metrics":
        columns = ("name", "quantity", "logger", "optimizer", "scope", "steps_judged",
                   "verdict", "matches", "logged_median", "true_median", "ratio", "nearest",
                   "nearest_ratio", "advice")  # fmt: skip
        rows = [{c: getattr(m, c) for c in columns} for m in report.metrics or ()]
        return rows, columns
    if kind == "findings":
        columns = ("kind", "optimizer", "first_step", "count", "gap", "advice")
        rows = [{c: getattr(f, c) for c in columns} for f in report.findings or ()]
        return rows, columns
    from sfdiag.probe.registry import did_you_mean

    raise SfdiagError(
        f"to_pandas: unknown table {kind!r}{did_you_mean(str(kind), KINDS)}; "
        f"choose one of: {', '.join(KINDS)}"
    )


def to_frame(report: ProbeReport, kind: str = "results") -> pandas.DataFrame:
    """The report's ``kind`` table (one of ``KINDS``) as a DataFrame."""
    rows, columns = _rows(report, kind)
    import pandas

    return pandas.DataFrame(rows, columns=list(columns))
