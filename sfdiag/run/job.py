"""One job, one report: every rank's findings, merged on rank 0.

Each rank sends rank 0 a ``RankSummary``: a few numbers and words per optimizer and
its judged metrics (never per-tensor data, so rank 0 receives O(ranks) summaries, not
O(ranks x tensors)). Rank 0 already holds the job's global norms (reduced during the
run) and merges: an optimizer's verdict is its worst rank's, a metric's likewise, the
ranks agree when every rank's whole grads equalled rank 0's. Pure: no torch here.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sfdiag.results import (
    FINDING_STEPS,
    METRIC_VERDICTS,
    DistributedInfo,
    Finding,
    MetricResult,
    OptimizerResult,
    ProbeReport,
    RankResult,
)
from sfdiag.step_audit.verdict import SEVERITY

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.run.watch import OptimizerWatch

#: past this many ranks, ``per_rank`` lists only the ranks that differ
PER_RANK_LIMIT = 64


@dataclass(frozen=True)
class OptimizerSummary:
    """One optimizer as one rank saw it."""

    label: str
    verdict: str
    fingerprint: str | None
    advice: str | None
    error: str | None
    params_mutated: int
    pre_step_grad_norm: float  # this rank's own grads (a DTensor's shard), median
    post_step_grad_norm: float
    sharded: bool  # stepped DTensor grads
    whole: bool  # stepped plain grads
    agreement_checked: bool
    disagreement: tuple[int, str] | None  # (step, parameter) where it differed from rank 0


@dataclass(frozen=True)
class RankSummary:
    rank: int
    code: int  # the script's exit code on this rank
    backend: str | None  # the script's process group backend, if it made one
    optimizers: tuple[OptimizerSummary, ...]
    metrics: tuple[MetricResult, ...]
    findings: tuple[Finding, ...] = ()


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize_rank(
    rank: int,
    code: int,
    results: Sequence[OptimizerResult],
    metrics: Sequence[MetricResult],
    findings: Sequence[Finding],
    watch: OptimizerWatch,
) -> RankSummary:
    """This rank's summary, from its own results and the watch's bookkeeping."""
    optimizers = []
    for result, entry in zip(results, watch.watched, strict=True):
        observations = entry.auditor.observations
        optimizers.append(
            OptimizerSummary(
                label=result.optimizer,
                verdict=result.verdict,
                fingerprint=result.fingerprint,
                advice=result.advice,
                error=result.error,
                params_mutated=result.params_mutated,
                pre_step_grad_norm=_median([o.pre_norm for o in observations]),
                post_step_grad_norm=_median([o.post_norm for o in observations]),
                sharded=entry.saw_sharded,
                whole=entry.saw_whole,
                agreement_checked=entry.agreement_checked,
                disagreement=entry.disagreement,
            )
        )
    if rank != 0:  # the plot draws rank 0's series: the others stay home
        metrics = [replace(m, series=None) for m in metrics]
    return RankSummary(
        rank, code, watch.script_backend, tuple(optimizers), tuple(metrics), tuple(findings)
    )


def strategy_of(summaries: Sequence[RankSummary]) -> str:
    """ddp (whole grads, a process group), fsdp (DTensor grads), mixed, or none."""
    sharded = any(o.sharded for s in summaries for o in s.optimizers)
    whole = any(o.whole for s in summaries for o in s.optimizers)
    grouped = any(s.backend for s in summaries)
    if sharded and whole:
        return "mixed"
    if sharded:
        return "fsdp"
    return "ddp" if whole and grouped else "none"


def _worst(summaries: Sequence[tuple[int, OptimizerSummary]]) -> tuple[int, OptimizerSummary]:
    return max(summaries, key=lambda item: (SEVERITY[item[1].verdict], -item[0]))


def _per_rank(
    found: Sequence[tuple[int, OptimizerSummary]],
) -> tuple[tuple[RankResult, ...], dict[str, float] | None]:
    """Every rank's row; past ``PER_RANK_LIMIT`` ranks only those whose verdict is not the
    most common one or that disagree with rank 0, and min / median / max of the norms."""
    rows = [
        RankResult(
            rank,
            o.verdict,
            o.pre_step_grad_norm,
            o.post_step_grad_norm,
            None if not o.agreement_checked else o.disagreement is None,
        )
        for rank, o in found
    ]
    if len(rows) <= PER_RANK_LIMIT:
        return tuple(rows), None
    pre = sorted(r.pre_step_grad_norm for r in rows)
    summary = {"ranks": len(rows), "min": pre[0], "median": _median(pre), "max": pre[-1]}
    usual = Counter(r.verdict for r in rows).most_common(1)[0][0]
    differing = tuple(r for r in rows if r.verdict != usual or r.agrees is False)
    return differing, summary


def _merge_metrics(summaries: Sequence[RankSummary]) -> tuple[MetricResult, ...]:
    """One entry per (logger, name): the worst rank's (the first rank's on a tie)."""
    rank_of = {v: i for i, v in enumerate(METRIC_VERDICTS)}
    merged: dict[tuple[str, str], MetricResult] = {}
    series: dict[tuple[str, str], Any] = {}
    for summary in summaries:
        for metric in summary.metrics:
            key = (metric.logger, metric.name)
            if metric.series is not None:
                series.setdefault(key, metric.series)
            held = merged.get(key)
            if held is None or rank_of[metric.verdict] > rank_of[held.verdict]:
                merged[key] = metric
    return tuple(
        m if m.series is not None or key not in series else replace(m, series=series[key])
        for key, m in merged.items()
    )


def _merge_findings(summaries: Sequence[RankSummary]) -> tuple[Finding, ...]:
    """One finding per (kind, optimizer): the earliest step, the most occurrences and the
    largest gap any rank saw (the ranks of a job run the same script)."""
    merged: dict[tuple[str, str], Finding] = {}
    for summary in summaries:
        for finding in summary.findings:
            key = (finding.kind, finding.optimizer)
            held = merged.get(key)
            if held is None:
                merged[key] = finding
                continue
            gaps = [g for g in (held.gap, finding.gap) if g is not None]
            merged[key] = replace(
                held if held.count >= finding.count else finding,
                first_step=min(held.first_step, finding.first_step),
                gap=max(gaps) if gaps else None,
                steps=tuple(sorted(set(held.steps) | set(finding.steps)))[:FINDING_STEPS],
            )
    return tuple(merged.values())


def merge(report: ProbeReport, summaries: Sequence[RankSummary]) -> ProbeReport:
    """Rank 0's report (``report``, with the job's global norms) made the job's."""
    by_rank = sorted(summaries, key=lambda s: s.rank)
    results = []
    disagreements = []
    checked = False
    for result in report.results:
        found = [(s.rank, o) for s in by_rank for o in s.optimizers if o.label == result.optimizer]
        if not found:
            results.append(result)
            continue
        worst_rank, worst = _worst(found)
        if worst_rank != 0 and SEVERITY[worst.verdict] > SEVERITY[result.verdict]:
            advice = worst.advice
            if advice:
                advice = f"on rank {worst_rank}: {advice}"
            result = replace(
                result,
                verdict=worst.verdict,
                fingerprint=worst.fingerprint,
                advice=advice,
                error=worst.error,
                params_mutated=worst.params_mutated,
            )
        per_rank, summary = _per_rank(found)
        results.append(replace(result, per_rank=per_rank, per_rank_summary=summary))
        for rank, o in found:
            checked = checked or o.agreement_checked
            if o.disagreement is not None:
                step, name = o.disagreement
                disagreements.append(
                    f"{result.optimizer}: rank {rank} differs from rank 0 at step {step} ({name})"
                )
    backend = next((s.backend for s in by_rank if s.backend), None)
    info = DistributedInfo(
        world_size=len(by_rank),
        backend=backend,
        strategy=strategy_of(by_rank),
        ranks_agree=(not disagreements) if checked else None,
        disagreements=tuple(disagreements),
    )
    return replace(
        report,
        results=tuple(results),
        metrics=_merge_metrics(by_rank),
        findings=_merge_findings(by_rank),
        distributed=info,
    )
