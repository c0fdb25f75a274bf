"""Words and numbers shared by every human-readable format (table, markdown, junit).

One place formats a number, one place says what happened to a flagged optimizer,
so the terminal table and a PR comment never disagree. Plain functions over the
records of ``sfdiag.results``; no rich, no pandas, no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.results import (
        CheckResult,
        Difference,
        Finding,
        MetricResult,
        OptimizerResult,
        ProbeReport,
    )

BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_BAD = "!"  # a step whose post/pre ratio is nan or inf
SPARK_WIDTH = 16  # longer probes are bucketed down to this many characters

_WHAT_HAPPENED = {
    "mutated": "p.grad was changed in place during step()",
    "replaced": "p.grad was replaced by another tensor during step()",
    "cleared": "p.grad was cleared (set to None) during step()",
}
_DEFAULT_ADVICE = "Read gradient metrics (norms, clipping, logging) before step()"


# -- numbers -------------------------------------------------------------------------


def fmt_num(value: float | None, missing: str = "-", digits: int = 4) -> str:
    """``digits`` significant digits; nan / inf / -inf as words; None as ``missing``."""
    if value is None:
        return missing
    x = float(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def fmt_ratio(value: float | None, missing: str = "-") -> str:
    """A post/pre ratio: ``867x``, ``1x``, ``0.5x``, ``nan``."""
    if value is None:
        return missing
    x = float(value)
    if not math.isfinite(x):
        return fmt_num(x)
    if 100 <= abs(x) < 1e6:
        return f"{x:.0f}x"
    return f"{fmt_num(x)}x"


def fmt_change(value: float | None, missing: str = "-") -> str:
    """A signed relative change: ``+12.5%``, ``-0.01%``, ``+inf``."""
    if value is None or math.isnan(value):
        return missing
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return f"{value * 100:+.3g}%"


def fmt_allowed(difference: Difference) -> str:
    """The tolerance of a baseline difference: a relative bound, 'exact', or '-' for a
    difference that is only a note (a version change)."""
    allowed = difference.allowed
    if allowed is None:
        return "exact" if difference.regression else "-"
    return f"±{allowed * 100:.3g}%"


def difference_status(difference: Difference) -> str:
    """REGRESSION; ok (moved within tolerance); note (reported, never a regression)."""
    if difference.regression:
        return "REGRESSION"
    return "ok" if difference.allowed is not None else "note"


def fmt_bytes_per_element(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{fmt_num(value)} B/el"


def fmt_shape(shape: Sequence[int]) -> str:
    return "×".join(str(n) for n in shape) if len(shape) else "scalar"


def fmt_value(value: Any, limit: int = 60) -> str:
    """Any value of a baseline difference, on one line; numbers with 7 significant
    digits, so that a norm that moved within tolerance still shows how."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return fmt_num(value, digits=7)
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt_mutated(result: OptimizerResult) -> str:
    if (result.verdict == "error" or none_audited(result)) and not result.params_with_grad:
        return "-"
    return f"{result.params_mutated}/{result.params_with_grad}"


def fmt_norm(result: OptimizerResult, value: float, ratio: bool = False) -> str:
    """A summary norm (or ratio); an error or unaudited row with no step shows '-', not 'nan'."""
    never = result.verdict == "error" and not result.steps
    if (never or none_audited(result)) and math.isnan(value):
        return "-"
    return fmt_ratio(value) if ratio else fmt_num(value)


#: marks a pre-step norm that is the gradient's before the script's clipping call
CLIP_MARK = "†"


def fmt_pre_step(result: OptimizerResult) -> str:
    """The pre-step column: the gradient's norm. Where the script's clipping call scaled the
    grads, that is the norm it measured (step() got the clipped grads): marked."""
    if not clipped(result):
        return fmt_norm(result, result.pre_step_grad_norm)
    return f"{fmt_num(result.pre_clip_grad_norm)} {CLIP_MARK}"


def clipped(result: OptimizerResult) -> bool:
    """The script's clipping call scaled the grads at an audited step: the norm step() got
    is not the gradient's."""
    return result.pre_clip_grad_norm is not None and result.clipped_steps > 0


def clip_notes(report: ProbeReport) -> list[str]:
    """What the mark means, per optimizer whose pre-step norm carries it."""
    notes = []
    for r in report.results:
        if not clipped(r):
            continue
        audited = sum(s.pre_clip_grad_norm is not None for s in r.steps)
        notes.append(
            f"{CLIP_MARK} {r.optimizer}: the gradient's norm as the script's clipping call "
            f"measured it, before clipping; it clipped at {r.clipped_steps} of {audited} "
            f"audited steps (the norm step() got: {fmt_num(r.pre_step_grad_norm)})"
        )
    return notes


def short_class(cls: str) -> str:
    """``sfdiag.optim:AdamWScheduleFree`` -> ``AdamWScheduleFree``."""
    return cls.rsplit(":", 1)[-1].rsplit(".", 1)[-1] or cls


#: what the verdict column adds to a clean verdict the audit could not tell from a change
UNDETERMINED = "NaN grads: could not tell"


def none_audited(result: OptimizerResult) -> bool:
    """Whether no step of the optimizer could be audited (each ran under torch.compile,
    where sfdiag's hooks cannot run): its verdict says nothing."""
    return result.not_audited is not None and not result.steps


def not_audited_text(result: OptimizerResult) -> str | None:
    """``steps under torch.compile: not audited, 5 of 8``; None where every step was seen."""
    unseen = result.not_audited
    if unseen is None:
        return None
    count = f"{unseen.steps} of {unseen.of}" if unseen.steps is not None else "how many unknown"
    return f"steps under {unseen.why}: not audited, {count}"


def verdict_text(result: OptimizerResult) -> str:
    if none_audited(result):
        return f"not audited ({result.not_audited.why})"
    if result.undetermined:
        return f"{result.verdict} ({UNDETERMINED})"
    return f"{result.verdict} ({result.fingerprint})" if result.fingerprint else result.verdict


# -- sentences -----------------------------------------------------------------------

#: the docs page that explains every kind an advice sentence names, one anchor per kind
DOCS_PAGE = "verdicts"


def docs_anchor(kind: str) -> str:
    """``[docs: verdicts#post-step]``: where ``docs/verdicts.md`` explains ``kind`` (its
    anchor is the kind as printed, spaces as hyphens: ``not audited`` -> ``not-audited``)."""
    return f"[docs: {DOCS_PAGE}#{'-'.join(kind.split())}]"


def with_docs(sentence: str | None, kind: str | None) -> str | None:
    """``sentence`` ending in ``kind``'s docs anchor (unchanged without a sentence or kind)."""
    if not sentence or not kind:
        return sentence
    return f"{sentence} {docs_anchor(kind)}"


def advice_kind(result: OptimizerResult) -> str | None:
    """The kind that an optimizer's advice sentence explains: a mutated row's fingerprint,
    else its verdict (``undetermined`` for a clean row it could not tell); None when clean."""
    if result.undetermined:
        return "undetermined"
    if not result.flagged:
        return None
    if result.verdict == "mutated" and result.fingerprint:
        return result.fingerprint
    return result.verdict


def _sentence(text: str) -> str:
    text = " ".join(text.split()).rstrip(".")
    if not text:
        return ""
    return text[0].upper() + text[1:] + "."


def advice_sentence(result: OptimizerResult) -> str | None:
    """What happened to a flagged optimizer and what to do about it; None when clean (and
    told apart from a change)."""
    label = result.optimizer
    if result.undetermined:
        return f"{label}: clean, but undetermined. {_sentence(result.advice or '')}"
    if not result.flagged:
        return None
    if result.verdict == "error":
        message = " ".join((result.error or "unknown error").split()).rstrip(".")
        todo = result.advice or "Fix its class or kwargs in the config, or leave it out"
        return f"{label}: could not be probed: {message}. {_sentence(todo)}"
    happened = _WHAT_HAPPENED.get(result.verdict, f"verdict {result.verdict}")
    if result.fingerprint:
        happened += f" ({result.fingerprint})"
    pre, post, ratio = (
        result.pre_step_grad_norm,
        result.post_step_grad_norm,
        result.norm_ratio,
    )
    if result.verdict == "cleared" and post == 0:
        detail = "nothing is left to read after step()"
    elif math.isfinite(ratio) and math.isfinite(pre) and pre > 0:
        detail = f"the norm read after step() is {fmt_ratio(ratio)} the gradient's"
    else:
        detail = (
            f"the norm read after step() is {fmt_num(post)} (the gradient's was {fmt_num(pre)})"
        )
    return f"{label}: {happened}: {detail}. {_sentence(result.advice or _DEFAULT_ADVICE)}"


def not_audited_sentence(result: OptimizerResult) -> str | None:
    """Which steps were not seen, and how to have them audited; None where all were."""
    text = not_audited_text(result)
    if text is None:
        return None
    return (
        f"{result.optimizer}: {text}: its step() was compiled into one graph (fullgraph=True), "
        "where sfdiag's step hooks cannot run; the verdict stands on the steps sfdiag saw, and "
        "no logged metric is judged against the others. Compile the step with fullgraph=False "
        "(torch.compile then runs the hooks between its graphs) to audit every step."
    )


def advice_sentences(report: ProbeReport, docs: bool = True) -> list[str]:
    """Each optimizer's advice sentence, then each one's unaudited steps; ``docs``: each
    ending in the anchor of the kind it explains (``[docs: verdicts#adam-normalized]``)."""
    sentences = [
        with_docs(advice_sentence(r), advice_kind(r) if docs else None) for r in report.results
    ]
    sentences += [
        with_docs(not_audited_sentence(r), "not audited" if docs else None) for r in report.results
    ]
    return [s for s in sentences if s]


def summary_line(report: ProbeReport) -> str:
    total = len(report.results)
    flagged = sum(r.flagged for r in report.results)
    errors = sum(r.verdict == "error" for r in report.results)
    noun = "optimizer" if total == 1 else "optimizers"
    line = f"{flagged} of {total} {noun} flagged"
    if errors:
        line += f" ({errors} error{'s' if errors != 1 else ''})"
    undetermined = sum(r.undetermined for r in report.results)
    if undetermined:
        line += f"; {undetermined} undetermined (NaN grads)"
    unaudited = sum(none_audited(r) for r in report.results)
    if unaudited:
        line += f"; {unaudited} not audited (torch.compile)"
    if report.metrics is not None:
        unseen = not report.metrics and any(r.not_audited for r in report.results)
        line += "; " + ("no gradient metric judged" if unseen else metrics_summary(report.metrics))
    if report.findings:
        kinds = sorted({f.kind for f in report.findings})
        line += f"; mode findings: {', '.join(kinds)}"
    return line


# -- logged metrics (sfdiag run) -------------------------------------------------------


def metrics_summary(metrics: Sequence[MetricResult]) -> str:
    """``2 logged gradient metrics: 1 correct, 1 post-step (wrong)`` (``metrics``, where
    learning rates are among them)."""
    from sfdiag.results import METRIC_VERDICTS, WRONG_METRIC_VERDICTS

    if not metrics:
        return "no gradient metric logged"
    counts = {v: sum(m.verdict == v for m in metrics) for v in METRIC_VERDICTS}
    parts = [
        f"{n} {v}" + (" (wrong)" if v in WRONG_METRIC_VERDICTS else "")
        for v, n in counts.items()
        if n
    ]
    noun = "metric" if len(metrics) == 1 else "metrics"
    kind = "gradient " if all(m.quantity == "grad_norm" for m in metrics) else ""
    return f"{len(metrics)} logged {kind}{noun}: {', '.join(parts)}"


def metric_sentence(metric: MetricResult, docs: bool = True) -> str | None:
    """What is wrong with a logged metric and where to read it instead, ending in its
    verdict's docs anchor (``docs``); None if right."""
    if metric.verdict == "correct" or not metric.advice:
        return None
    # the advice starts with the metric's name: no capital put on it
    advice = " ".join(metric.advice.split()).rstrip(".")
    return with_docs(
        f"{metric.verdict} ({metric.logger}): {advice}.", metric.verdict if docs else None
    )


def metric_sentences(report: ProbeReport, docs: bool = True) -> list[str]:
    return [s for s in (metric_sentence(m, docs) for m in report.metrics or ()) if s]


def distributed_line(report: ProbeReport) -> str | None:
    """``2 ranks (gloo, ddp): their grads agree`` for a job (``1 rank (gloo, ddp)``)."""
    info = report.distributed
    if info is None:
        return None
    how = ", ".join(x for x in (info.backend, info.strategy) if x)
    if info.world_size == 1:  # no other rank to agree with
        return f"1 rank ({how}), audited as one job"
    line = f"{info.world_size} ranks ({how}), audited as one job"
    if info.ranks_agree is True:
        return line + ": every rank stepped the same gradients"
    if info.ranks_agree is None:
        return line
    return line + ": RANKS STEP DIFFERENT GRADIENTS: " + "; ".join(info.disagreements)


def per_rank_lines(report: ProbeReport) -> list[str]:
    """An optimizer whose ranks' verdicts differ: what each rank saw (``AdamW by rank: 0
    clean, 1 mutated``). Ranks that agree need no line."""
    lines = []
    for result in report.results:
        ranks = result.per_rank or ()
        if len({r.verdict for r in ranks}) > 1:
            seen = ", ".join(f"{r.rank} {r.verdict}" for r in ranks)
            more = " (the ranks that differ)" if result.per_rank_summary else ""
            lines.append(f"{result.optimizer} by rank{more}: {seen}")
    return lines


def finding_line(finding: Finding, docs: bool = True) -> str:
    """``eval-in-train-mode: AdamWScheduleFree, 12 times from step 4: ... [docs:
    verdicts#eval-in-train-mode]`` (the anchor with ``docs``)."""
    from sfdiag.run.findings import FINDING_UNITS

    one, many = FINDING_UNITS.get(finding.kind, ("time", "times"))
    counted = f"{finding.count} {one if finding.count == 1 else many}"
    when = f"from step {finding.first_step}" if finding.first_step >= 0 else "before any step"
    level = "" if finding.failing else "warning: "
    advice = " ".join(finding.advice.split()).rstrip(".")
    line = f"{level}{finding.kind}: {finding.optimizer}, {counted} {when}: {advice}."
    return with_docs(line, finding.kind if docs else None) or line


def findings_lines(report: ProbeReport, docs: bool = True) -> list[str]:
    return [finding_line(f, docs) for f in report.findings or ()]


NO_METRICS_NOTE = (
    "No gradient metric was logged through TensorBoard, W&B, MLflow, Lightning or "
    "Transformers (--metric NAME judges a name the pattern misses)."
)


def interrupted_line(report: ProbeReport) -> str | None:
    if not report.interrupted:
        return None
    config = report.config if isinstance(report.config, dict) else {}
    if "command" in config or config.get("in_process"):  # sfdiag run, sfdiag.audit()
        return "Interrupted: the script was stopped; the rows cover the steps it finished."
    done = len(report.results)
    planned = report.config.get("optimizers") if isinstance(report.config, dict) else None
    of = f" of {len(planned)}" if isinstance(planned, list) and len(planned) >= done else ""
    return (
        f"Interrupted: only {done}{of} optimizer{'s' if done != 1 else ''} finished; "
        "the results below are partial."
    )


def header_line(report: ProbeReport) -> str:
    config = report.config if isinstance(report.config, dict) else {}
    parts = []
    steps = config.get("steps")
    if steps is not None:
        parts.append(f"{steps} steps")
    model = config.get("model")
    if isinstance(model, dict) and model.get("name"):
        parts.append(f"model {model['name']}")
    if config.get("seed") is not None:
        parts.append(f"seed {config['seed']}")
    parts.append(f"sfdiag {report.sfdiag_version}")
    parts.append(f"torch {report.torch_version}")
    return ", ".join(parts)


def check_summary_line(check: CheckResult) -> str:
    n = len(check.regressions)
    if n == 0:
        return "no regression"
    return f"{n} regression{'s' if n != 1 else ''}"


# -- sparkline -----------------------------------------------------------------------


def _log_ratios(result: OptimizerResult) -> list[float]:
    """log10(post/pre) per step; nan for a step with a nan/inf ratio, -inf for 0."""
    out = []
    for step in result.steps:
        r = step.ratio
        if math.isnan(r) or math.isinf(r) or r < 0:
            out.append(math.nan)
        elif r == 0:
            out.append(-math.inf)
        else:
            out.append(math.log10(r))
    return out


def spark_scale(results: Iterable[OptimizerResult]) -> tuple[float, float]:
    """One log10 scale for every row of a table, always containing ratio 1 (log 0)."""
    lo = hi = 0.0
    for result in results:
        for v in _log_ratios(result):
            if math.isfinite(v):
                lo, hi = min(lo, v), max(hi, v)
    return lo, hi


def sparkline(result: OptimizerResult, scale: tuple[float, float], width: int = SPARK_WIDTH) -> str:
    """The post/pre ratio of each step as a bar on a log scale; '!' marks nan/inf."""
    values = _log_ratios(result)
    if not values:
        return ""
    if len(values) > width:  # bucket: keep the step furthest from ratio 1 in each bucket
        buckets = []
        for i in range(width):
            chunk = values[i * len(values) // width : (i + 1) * len(values) // width]
            buckets.append(max(chunk, key=lambda v: math.inf if math.isnan(v) else abs(v)))
        values = buckets
    lo, hi = scale
    chars = []
    for v in values:
        if math.isnan(v):
            chars.append(SPARK_BAD)
        elif hi <= lo:
            chars.append(BLOCKS[0])
        else:
            pos = (min(max(v, lo), hi) - lo) / (hi - lo)
            chars.append(BLOCKS[min(len(BLOCKS) - 1, int(pos * len(BLOCKS)))])
    return "".join(chars)
