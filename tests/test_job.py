"""sfdiag.run.job: every rank's summary merged into the job's report (pure, no ranks)."""

from __future__ import annotations

import pytest

from sfdiag.report import render
from sfdiag.results import MetricResult, OptimizerResult, ProbeReport
from sfdiag.run import gate
from sfdiag.run.job import PER_RANK_LIMIT, OptimizerSummary, RankSummary, merge, strategy_of


def summary(
    rank: int,
    verdict: str = "clean",
    *,
    fingerprint: str | None = None,
    disagreement: tuple[int, str] | None = None,
    sharded: bool = False,
    whole: bool = True,
    backend: str | None = "gloo",
    metrics: tuple[MetricResult, ...] = (),
    norm: float = 1.0,
) -> RankSummary:
    optimizer = OptimizerSummary(
        label="AdamW",
        verdict=verdict,
        fingerprint=fingerprint,
        advice=None if verdict == "clean" else "log it before step()",
        error=None,
        params_mutated=0 if verdict == "clean" else 2,
        pre_step_grad_norm=norm,
        post_step_grad_norm=norm,
        sharded=sharded,
        whole=whole,
        agreement_checked=whole and backend is not None,
        disagreement=disagreement,
    )
    return RankSummary(rank, 0, backend, (optimizer,), metrics)


def rank0_report() -> ProbeReport:
    row = OptimizerResult("AdamW", "torch.optim:AdamW", "clean", 1.0, 1.0, 1.0, 0, 2)
    return ProbeReport({"command": ["python", "t.py"]}, (row,), "0.1.0", "2.13", metrics=())


def metric(verdict: str) -> MetricResult:
    return MetricResult("grad_norm", "grad_norm", "tensorboard", "AdamW", 3, verdict, None, 1, 1, 1)


def test_the_job_verdict_is_the_worst_ranks():
    merged = merge(rank0_report(), [summary(0), summary(1, "mutated", fingerprint="weight-decay")])
    (row,) = merged.results
    assert (row.verdict, row.fingerprint, row.params_mutated) == ("mutated", "weight-decay", 2)
    assert row.advice.startswith("on rank 1:")
    assert [(r.rank, r.verdict, r.agrees) for r in row.per_rank] == [
        (0, "clean", True),
        (1, "mutated", True),
    ]
    assert merged.distributed.ranks_agree is True
    text = render(merged, "table")
    assert "2 ranks (gloo, ddp), audited as one job" in text
    assert "AdamW by rank: 0 clean, 1 mutated" in text


def test_disagreeing_ranks_are_named_and_fail_strict():
    merged = merge(rank0_report(), [summary(0), summary(1, disagreement=(0, "fc.weight"))])
    assert merged.distributed.ranks_agree is False
    assert merged.distributed.disagreements == (
        "AdamW: rank 1 differs from rank 0 at step 0 (fc.weight)",
    )
    assert gate(merged, strict=True) is True
    assert "RANKS STEP DIFFERENT GRADIENTS" in render(merged, "table")
    data = merged.to_dict()
    assert data["distributed"]["ranks_agree"] is False
    assert data["results"][0]["per_rank"][1]["agrees"] is False


def test_past_the_limit_only_the_ranks_that_differ_are_listed():
    ranks = 3 * PER_RANK_LIMIT
    summaries = [summary(r, norm=float(r)) for r in range(ranks)]
    summaries[77] = summary(77, "mutated", fingerprint="scaled", norm=77.0)
    merged = merge(rank0_report(), summaries)
    (row,) = merged.results
    assert [r.rank for r in row.per_rank] == [77]
    assert row.per_rank_summary == {
        "ranks": ranks,
        "min": 0.0,
        "median": pytest.approx((ranks - 1) / 2),
        "max": float(ranks - 1),
    }
    assert merged.distributed.world_size == ranks


def test_metrics_merge_to_the_worst_rank_and_strategies_are_named():
    merged = merge(
        rank0_report(),
        [summary(0, metrics=(metric("correct"),)), summary(1, metrics=(metric("local-shard"),))],
    )
    assert [m.verdict for m in merged.metrics] == ["local-shard"]
    assert strategy_of([summary(0, sharded=True, whole=False)]) == "fsdp"
    assert strategy_of([summary(0, sharded=True, whole=True)]) == "mixed"
    assert strategy_of([summary(0)]) == "ddp"
    assert strategy_of([summary(0, backend=None)]) == "none"
    unchecked = merge(rank0_report(), [summary(0, backend=None), summary(1, backend=None)])
    assert unchecked.distributed.ranks_agree is None


def test_findings_merge_by_kind_and_optimizer():
    from sfdiag.results import Finding

    def finding(step: int, count: int, gap: float | None) -> Finding:
        return Finding("eval-in-train-mode", "AdamW", step, count, "call optimizer.eval()", gap)

    first = RankSummary(0, 0, "gloo", (), (), (finding(9, 2, 0.01),))
    second = RankSummary(1, 0, "gloo", (), (), (finding(4, 3, 0.03),))
    merged = merge(rank0_report(), [first, second])
    (one,) = merged.findings
    assert (one.first_step, one.count, one.gap) == (4, 3, 0.03)
    assert gate(merged, strict=True) is True


def test_the_rank_that_raised_is_named_over_one_a_signal_ended():
    from types import SimpleNamespace

    from sfdiag.run.launch import root_failure

    def failure(code: int, when: float) -> SimpleNamespace:
        return SimpleNamespace(exitcode=code, timestamp=when)

    # rank 0 aborted by gloo when rank 1 went away, seen in the same poll or even earlier
    assert root_failure({0: failure(-6, 10), 1: failure(1, 10)})[0] == 1
    assert root_failure({0: failure(-6, 9), 1: failure(1, 10)})[0] == 1
    # among errors, the earliest; a tie goes to the lower rank
    assert root_failure({0: failure(1, 11), 1: failure(2, 10)})[0] == 1
    assert root_failure({2: failure(1, 10), 1: failure(1, 10)})[0] == 1
    # only signals: the earliest
    assert root_failure({0: failure(-15, 12), 1: failure(-9, 11)})[0] == 1
