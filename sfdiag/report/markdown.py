"""``--format markdown``: a GitHub pipe table plus the advice as bullets, for a PR comment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sfdiag.report import _text

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.report._options import RenderOptions
    from sfdiag.results import CheckResult, OptimizerResult, ProbeReport


def escape(text: str) -> str:
    """Safe inside a table cell or a bullet: no raw pipes, HTML or line breaks."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")
    text = text.replace("`", "\\`").replace("<", "&lt;").replace(">", "&gt;")
    return " ".join(text.split())


def _table(header: Sequence[str], align: Sequence[str], rows: list[list[str]]) -> list[str]:
    """``align`` per column: 'l' or 'r'. Cells must be escaped already."""
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    lines.extend("| " + " | ".join(cell or " " for cell in row) + " |" for row in rows)
    return lines


def _verdict_cell(verdict: str, fingerprint: str | None) -> str:
    text = escape(verdict) if verdict == "clean" else f"**{escape(verdict)}**"
    return f"{text} ({escape(fingerprint)})" if fingerprint else text


def _results_table(report: ProbeReport) -> list[str]:
    scale = _text.spark_scale(report.results)
    rows = [
        [
            escape(r.optimizer),
            escape(_text.short_class(r.cls)),
            _text.fmt_norm(r, r.pre_step_grad_norm),
            _text.fmt_norm(r, r.post_step_grad_norm),
            _text.fmt_norm(r, r.norm_ratio, ratio=True),
            escape(_text.sparkline(r, scale) or "-"),
            _text.fmt_mutated(r),
            _text.fmt_bytes_per_element(r.state_bytes_per_element),
            _verdict_cell("not audited", r.not_audited.why)
            if _text.none_audited(r)
            else _verdict_cell(r.verdict, _text.UNDETERMINED if r.undetermined else r.fingerprint),
        ]
        for r in report.results
    ]
    return _table(
        [
            "optimizer",
            "class",
            "pre-step ‖g‖",
            "post-step ‖g‖",
            "ratio",
            "ratio per step",
            "mutated",
            "state",
            "verdict",
        ],
        "llrrrlrrl",
        rows,
    )


def _param_table(result: OptimizerResult) -> list[str]:
    rows = [
        [
            escape(p.name),
            _text.fmt_shape(p.shape),
            _text.fmt_num(p.pre_step_grad_norm),
            _text.fmt_num(p.post_step_grad_norm),
            _text.fmt_num(p.max_rel_change),
            _verdict_cell(p.verdict, None),
            escape(p.fingerprint or "-"),
        ]
        for p in result.params
    ]
    title = f"#### {escape(result.optimizer)} ({escape(_text.short_class(result.cls))})"
    header = ["parameter", "shape", "pre-step ‖g‖", "post-step ‖g‖", "max rel change"]
    return [title, "", *_table([*header, "verdict", "fingerprint"], "llrrrll", rows)]


def render_report(report: ProbeReport, options: RenderOptions) -> str:
    lines = [f"### sfdiag: {_text.summary_line(report)}", ""]
    interrupted = _text.interrupted_line(report)
    if interrupted:
        lines += [f"> **{escape(interrupted)}**", ""]
    if report.results:
        lines += [*_results_table(report), ""]
    sentences = _text.advice_sentences(report)
    if sentences:
        lines += [f"- {escape(s)}" for s in sentences]
        lines.append("")
    if options.per_param:
        for result in report.results:
            if result.params:
                lines += [*_param_table(result), ""]
    lines.append(f"<sub>{escape(_text.header_line(report))}</sub>")
    return "\n".join(lines) + "\n"


def render_check(check: CheckResult, options: RenderOptions) -> str:
    verdict = _text.check_summary_line(check)
    lines = [f"### sfdiag check: {verdict}", ""]
    if check.baseline_path:
        lines += [f"Compared with baseline {escape(str(check.baseline_path))}.", ""]
    if check.differences:
        rows = [
            [
                escape(d.optimizer or "(all)"),
                escape(d.what),
                escape(_text.fmt_value(d.baseline_value)),
                escape(_text.fmt_value(d.current_value)),
                _text.fmt_change(d.change),
                _text.fmt_allowed(d),
                f"**{_text.difference_status(d)}**" if d.regression else _text.difference_status(d),
            ]
            for d in check.differences
        ]
        header = ["optimizer", "what moved", "baseline", "now", "change", "allowed", "status"]
        lines += [*_table(header, "llrrrrl", rows), ""]
    else:
        lines += ["Nothing moved: this run matches the baseline.", ""]
    return "\n".join(lines)
