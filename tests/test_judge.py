"""sfdiag.run.judge: which logged names are gradient metrics, and the verdict of each value."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from sfdiag.results import METRIC_VERDICTS, WRONG_METRIC_VERDICTS, MetricResult, ProbeReport
from sfdiag.run import findings, gate, judge, metric_names
from sfdiag.run.judge import (
    JudgedValue,
    MetricTally,
    NormReferences,
    judge_candidates,
    judge_value,
    summarize_metric,
)
from sfdiag.run.metric_names import MetricSelector, is_grad_norm_word, scope_hint

PICKED = [
    "grad_norm",
    "gradient_norm",
    "grad_2.0_norm_total",
    "gnorm",
    "train/grad_norm",
    "GradNorm",
    "gradNorm",
    "grad-norm",
    "total_grad_norm",
    "global_grad_norm",
    "grad_norm_total",
    "grad_l2_norm",
    "grads_norm",
    "train/grad_norm_step",
    "grad_norm_clipped",
    "grad_norm_before_clip",
    "model/gradient_norm",
    "grad_2.0_norm/net.0.weight",  # a parameter (or module) after a grad-norm part
    "grad_norm/encoder",
    # qualifiers around the core: picked and judged like any other
    "grad_norm_local",
    "local_grad_norm",
    "grad_norm_rank0",
    "grad_norm_rank_3",
    "grad_norm_scaled",
    "grad_norm_unscaled",
    "grad_norm_micro",
    "grad_norm_accum",
    "train/grad_norm_gpu1",
    # ... and averages over steps (judged as such where a step's norm does not fit)
    "grad_norm_ema",
    "smoothed_grad_norm",
    "gradient_norm_mean",
    "grad_norm_avg",
    "grad_norm_epoch",  # Lightning's epoch mean
]
NOT_PICKED = [
    "loss",
    "train/loss",
    "lr",  # a learning rate: judged as one, not as a gradient norm
    "learning_rate",
    "epoch",
    "grad_1.0_norm_total",  # an L1 norm is no L2 norm
    "grad_inf_norm_total",
    "param_norm",
    "weight_norm",
    "update_norm",
    "grad_norm_ratio",
    "grad_norm_sq",
    "grad_1.0_norm",
    "global_step",
    "iter",
    "grad",
    "norm",
    "grad_norm/encoder/extra",
    "",
]


@pytest.mark.parametrize("name", PICKED)
def test_the_pattern_picks_gradient_norm_names(name):
    assert MetricSelector().selects(name)


@pytest.mark.parametrize("name", NOT_PICKED)
def test_the_pattern_leaves_other_names_alone(name):
    expected = "learning_rate" if name in ("lr", "learning_rate") else None
    assert MetricSelector().quantity(name) == expected


RATES = [
    ("lr", 0),
    ("learning_rate", 0),
    ("train/lr", 0),
    ("LearningRate", 0),
    ("lr-AdamW", 0),  # Lightning's LearningRateMonitor
    ("lr-AdamW/pg2", 1),  # ... counts its groups from 1
    ("lr/group1", 1),
    ("lr_group_1", 1),
    ("scheduled_lr", 0),
]


@pytest.mark.parametrize(("name", "group"), RATES)
def test_learning_rate_names_and_their_groups(name, group):
    assert MetricSelector().quantity(name) == "learning_rate"
    assert metric_names.rate_group(name) == group


@pytest.mark.parametrize("name", ["lr-AdamW-momentum", "lr-SGD-weight_decay", "lr_scale", "mlr"])
def test_what_lightning_logs_beside_a_rate_is_no_rate(name):
    assert MetricSelector().quantity(name) is None


def test_globs_add_names_but_never_losses_or_counts():
    selector = MetricSelector(("clip_*", "*/norm_of_grads", "train/*"))
    assert selector.quantity("clip_total") == "grad_norm"
    assert selector.quantity("model/norm_of_grads") == "grad_norm"
    assert selector.quantity("train/anything") == "grad_norm"
    assert selector.quantity("train/loss") is None  # a glob never picks a loss...
    assert selector.quantity("train/epoch") is None
    assert MetricSelector(("train/loss",)).selects("train/loss")  # ...an exact name does
    assert not MetricSelector(("Clip_*",)).selects("clip_total")  # case-sensitive, like names
    assert MetricSelector(("my_*",)).quantity("my_lr_now") == "learning_rate"


def test_scope_hints():
    assert scope_hint("grad_2.0_norm/net.0.weight") == "net.0.weight"
    assert scope_hint("train/grad_norm") is None
    assert scope_hint("grad_norm") is None
    assert is_grad_norm_word("grad_2.0_norm_total")
    assert not is_grad_norm_word("grad_norm_grad_norm")  # two cores: not one metric


# ---- one value ----------------------------------------------------------------------------
def refs(pre=1.0, post=1.0, pre_clip=None, clipped=False, local=None, step=0) -> NormReferences:
    return NormReferences(
        step=step,
        pre_step=pre,
        post_step=post,
        pre_clip=pre_clip,
        clipped=clipped,
        local_shard=local,
    )


@pytest.mark.parametrize(
    ("logged", "references", "verdict", "matches"),
    [
        (2.0, refs(pre=2.0, post=600.0), "correct", "pre-step"),
        (600.0, refs(pre=2.0, post=600.0), "post-step", "post-step"),
        (4.0, refs(pre=2.0, post=600.0), "unmatched", None),
        (9.0, refs(pre=1.0, post=1.0, pre_clip=9.0, clipped=True), "correct", "pre-clip"),
        (1.0, refs(pre=1.0, post=1.0, pre_clip=9.0, clipped=True), "clipped", "post-clip"),
        # clipping that did not bite: the pre-step norm is the gradient's
        (0.5, refs(pre=0.5, post=0.5, pre_clip=0.5000001), "correct", "pre-clip"),
        (0.5, refs(pre=0.5, post=0.5, pre_clip=0.51, clipped=False), "correct", "pre-step"),
        # a clean optimizer: post == pre, and correct comes first
        (3.0, refs(pre=3.0, post=3.0), "correct", "pre-step"),
        (0.7, refs(pre=1.0, post=5.0, local=0.7), "local-shard", "local-shard"),
        (1.0005, refs(pre=1.0, post=5.0), "correct", "pre-step"),  # within 1e-3
        (1.002, refs(pre=1.0, post=5.0), "unmatched", None),
        (0.0, refs(pre=0.0, post=0.0), "correct", "pre-step"),
        (math.nan, refs(pre=math.nan, post=math.nan), "correct", "pre-step"),
        (math.nan, refs(pre=1.0, post=2.0), "unmatched", None),
        (math.inf, refs(pre=math.inf, post=1.0), "correct", "pre-step"),
    ],
)
def test_judge_value(logged, references, verdict, matches):
    assert judge_value(logged, references, 1e-3) == (verdict, matches)


# the causes (issue 24): a step of 2 micro-batches at loss scale 1024, its gradient 1.0
CAUSES = dict(pre=1.0, post=1.0)


def causes(**fields) -> NormReferences:
    return replace(refs(**CAUSES), micro_batches=2, loss_scale=1024.0, **fields)


@pytest.mark.parametrize(
    ("logged", "references", "verdict", "matches"),
    [
        (1024.0, causes(), "loss-scaled", "loss-scale"),
        # unscaled by the scale after an update() that halved it: off by 2x
        (2.0, causes(next_scale=512.0), "loss-scaled", "scale-change"),
        (512.0, causes(next_scale=512.0), "loss-scaled", "next-scale"),
        (0.4, causes(at_log=0.4, micro_at_log=1), "partial-accumulation", "at-log"),
        (
            410.0,
            causes(at_log=410.0, micro_at_log=1, scaled_at_log=True),
            "partial-accumulation",
            "at-log, loss-scaled",
        ),
        # after the last backward the grads are the step's: the at-log norm is no partial sum
        (0.4, causes(at_log=0.4, micro_at_log=2), "unmatched", None),
        # nor is it before any backward (read after zero_grad: 0)
        (0.0, causes(at_log=0.0, micro_at_log=0), "zeroed", "zero"),
        (3.0, causes(earlier=((4, 3.0),)), "previous-step", "step 4"),
        # an earlier step's norm that is also this step's: this step's
        (1.0, causes(earlier=((4, 1.0),)), "correct", "pre-step"),
        # the right reading first: a skipped attempt's NaN, a note
        (
            math.nan,
            replace(refs(pre=math.nan, post=math.nan), skipped=True),
            "skipped-step",
            "pre-step",
        ),
        # a value that is both the gradient's norm and a partial sum: correct
        (1.0, causes(at_log=1.0, micro_at_log=1), "correct", "pre-step"),
        # both a still-scaled partial sum and the scale times the norm: the partial sum
        (
            1024.0,
            causes(at_log=1024.0, micro_at_log=1, scaled_at_log=True),
            "partial-accumulation",
            "at-log, loss-scaled",
        ),
        (0.0, causes(), "zeroed", "zero"),
    ],
)
def test_judge_value_names_the_causes_in_their_order(logged, references, verdict, matches):
    assert judge_value(logged, references, 1e-3) == (verdict, matches)


RATE_ONLY = ("next-step", "base-lr", "other-group")
RATE_VERDICTS = (*RATE_ONLY, "skipped-step", "unmatched")
ADVISED = [(v, "grad_norm") for v in METRIC_VERDICTS[1:] if v not in RATE_ONLY] + [
    (v, "learning_rate") for v in RATE_VERDICTS
]


@pytest.mark.parametrize(("verdict", "quantity"), ADVISED)
def test_every_verdict_has_advice_of_its_own(verdict, quantity):
    rate = judge.RateReferences(step=3, applied=1e-3, base=2e-3, next_applied=5e-4, group=0)
    references = rate if quantity == "learning_rate" else causes(micro_at_log=1)
    tally = MetricTally()
    tally.add(judge.JudgedValue(3, "AdamW", 2.0, references, verdict, "group 1"))
    advice = judge.summarize_metric("g", "tensorboard", tally, quantity=quantity).advice
    assert advice and advice != f"g: {verdict}" and len(advice) > 40, advice


def test_rtol_is_honoured():
    assert judge_value(1.01, refs(pre=1.0, post=9.0), 0.02)[0] == "correct"
    assert judge_value(1.01, refs(pre=1.0, post=9.0), 1e-3)[0] == "unmatched"


def test_candidates_best_verdict_wins_and_ties_keep_the_first():
    before = refs(pre=1.0, post=300.0, step=4)
    after = refs(pre=2.0, post=500.0, step=5)
    best = judge_candidates(300.0, [("opt", before), ("opt", after)], 1e-3)
    assert (best.step, best.verdict) == (4, "post-step")
    best = judge_candidates(2.0, [("opt", before), ("opt", after)], 1e-3)
    assert (best.step, best.verdict) == (5, "correct")
    # clipped to max_norm at both steps: a tie, the first candidate keeps it
    a = refs(pre=0.5, post=0.5, pre_clip=7.0, clipped=True, step=1)
    b = refs(pre=0.5, post=0.5, pre_clip=9.0, clipped=True, step=2)
    assert judge_candidates(0.5, [("o", b), ("o", a)], 1e-3).step == 2
    assert judge_candidates(0.5, [("o", a), ("o", b)], 1e-3).step == 1
    assert judge_candidates(1.0, [], 1e-3) is None


# ---- a metric over its steps -------------------------------------------------------------
def tally_of(values: list[tuple[int, float, NormReferences]]) -> MetricTally:
    tally = MetricTally()
    for step, logged, r in values:
        verdict, matches = judge_value(logged, r, 1e-3)
        tally.add(JudgedValue(step, "AdamW", logged, r, verdict, matches))
    return tally


def test_a_metric_is_its_worst_step():
    values = [(s, 1.0, refs(pre=1.0, post=80.0, step=s)) for s in range(10)]
    values[6] = (6, 80.0, refs(pre=1.0, post=80.0, step=6))
    result = summarize_metric("grad_norm", "tensorboard", tally_of(values))
    assert result.verdict == "post-step" and result.matches == "post-step"
    assert result.steps_judged == 10 and result.optimizer == "AdamW"
    assert result.logged_median == 1.0 and result.true_median == 1.0 and result.ratio == 1.0
    assert [e.step for e in result.examples] == [0, 6, 9]
    assert result.wrong and "after" in result.advice


def test_examples_are_few_and_in_step_order():
    verdict_cycle = [1.0, 80.0, 5.0]  # correct, post-step, unmatched
    values = [
        (s, verdict_cycle[i % 3], refs(pre=1.0, post=80.0, step=s))
        for i, s in enumerate(range(0, 3000, 3))
    ]
    tally = tally_of(values)
    examples = tally.examples()
    assert 1 < len(examples) <= judge.EXAMPLES
    assert [e.step for e in examples] == sorted(e.step for e in examples)
    assert examples[0].step == 0 and examples[-1].step == values[-1][0]
    assert tally.verdict == "unmatched"


def test_unmatched_says_the_nearest_and_spots_a_square():
    squares = [(s, 4.0, refs(pre=2.0, post=200.0, step=s)) for s in range(3)]
    result = summarize_metric("grad_norm", "wandb", tally_of(squares))
    assert result.verdict == "unmatched" and result.matches is None
    assert result.nearest == "pre-step" and result.nearest_ratio == pytest.approx(2.0)
    assert "square of the pre-step norm" in result.advice
    halves = [(s, 1.0, refs(pre=2.0, post=200.0, step=s)) for s in range(3)]
    result = summarize_metric("grad_norm", "wandb", tally_of(halves))
    assert result.nearest_ratio == pytest.approx(0.5) and "0.5x" in result.advice


@pytest.mark.parametrize("logger", ["lightning", "transformers", "tensorboard"])
def test_post_step_advice_names_where_to_read_it(logger):
    values = [(0, 80.0, refs(pre=1.0, post=80.0))]
    advice = summarize_metric("gn", logger, tally_of(values)).advice
    expected = {
        "lightning": "on_before_optimizer_step",
        "transformers": "on_pre_optimizer_step",
        "tensorboard": "GradMonitor",
    }[logger]
    assert expected in advice


def test_the_verdict_vocabulary_matches_the_contract():
    assert METRIC_VERDICTS[0] == "correct" and METRIC_VERDICTS[-1] == "unmatched"
    notes = {"correct", "clipped", "averaged", "skipped-step"}
    assert WRONG_METRIC_VERDICTS == set(METRIC_VERDICTS) - notes


# ---- the --strict gate of sfdiag run -------------------------------------------------------
def _metric(verdict: str) -> MetricResult:
    return MetricResult("grad_norm", "grad_norm", "tensorboard", "AdamW", 3, verdict, None, 1, 1, 1)


def _report(flagged: bool, metrics) -> ProbeReport:
    from sfdiag.results import OptimizerResult

    row = OptimizerResult("AdamW", "torch.optim:AdamW", "mutated" if flagged else "clean")
    return ProbeReport({}, (row,), "0", "0", metrics=metrics)


@pytest.mark.parametrize(
    ("flagged", "metrics", "fails"),
    [
        (True, (), True),  # no gradient metric logged: a flagged optimizer fails
        (True, None, True),
        (False, (), False),
        (True, ("correct", "clipped"), False),  # the user's numbers are right
        (False, ("correct", "post-step"), True),
        (False, ("unmatched",), True),
        (False, ("local-shard",), True),
    ],
)
def test_strict_gate(flagged, metrics, fails):
    found = None if metrics is None else tuple(_metric(v) for v in metrics)
    report = _report(flagged, found)
    assert gate(report, strict=True) is fails
    assert gate(report, strict=False) is False


# ---- learning rates ------------------------------------------------------------------------
RATES = judge.RateReferences(step=3, applied=2e-4, base=1e-3, next_applied=3e-4, next_base=1.2e-3)


@pytest.mark.parametrize(
    ("logged", "expected"),
    [
        (2e-4, ("correct", "applied")),
        (2e-4 * (1 + 5e-4), ("correct", "applied")),  # within rtol
        (1e-3, ("base-lr", "base-lr")),
        (3e-4, ("next-step", "next-step")),
        (1.2e-3, ("next-step", "next-step")),  # the next step's group["lr"]
        (5e-4, ("unmatched", None)),
        (math.nan, ("unmatched", None)),
    ],
)
def test_judge_rate(logged, expected):
    assert judge.judge_rate(logged, RATES, 1e-3) == expected


def test_a_rate_that_is_both_the_base_and_the_next_steps_reads_as_the_base():
    refs = judge.RateReferences(step=1, applied=5.6e-5, base=1.7e-4, next_applied=1.7e-4)
    assert judge.judge_rate(1.7e-4, refs, 1e-3) == ("base-lr", "base-lr")


@pytest.mark.parametrize(
    ("rows", "count", "first"),
    [
        # (step, base, the step before's base, applied, own warmup on)
        ([(0, 0.0, 0.0, 0.0, True), (1, 1e-4, 0.0, 2e-5, True), (2, 2e-4, 1e-4, 6e-5, True)], 2, 1),
        ([(0, 1e-3, 1e-3, 2e-4, True), (1, 1e-3, 1e-3, 4e-4, True)], 0, -1),  # constant rate
        ([(1, 1e-4, 0.0, 1e-4, False), (2, 2e-4, 1e-4, 2e-4, False)], 0, -1),  # no own warmup
        ([(1, 9e-4, 1e-3, 2e-4, True)], 0, -1),  # a decaying rate
    ],
)
def test_double_warmup(rows, count, first):
    tally = findings.double_warmup(rows, peak=1e-3)
    assert (tally.count, tally.first_step) == (count, first)
    if count:
        assert tally.detail == "at step 1 the applied rate is 0.02x the base (2e-05 of 0.001)"
        (finding,) = findings.mode_findings({("SF", "double-warmup"): tally})
        assert not finding.failing and "warmup applied twice" in finding.advice


@pytest.mark.parametrize("verdict", ["correct", "next-step", "base-lr", "unmatched"])
def test_rate_advice_says_when_the_optimizer_scales_its_rate_further(verdict):
    refs = judge.RateReferences(step=0, applied=1e-3, base=1e-3, scaled_by="d")
    value = JudgedValue(0, "Prodigy", 1e-3, refs, verdict, None)
    advice = judge.rate_advice(verdict, "lr", "Prodigy", value, None)
    assert advice.endswith("Prodigy scales the rate it is given further by its own d (not judged)")
    plain = judge.RateReferences(step=0, applied=1e-3, base=1e-3)
    without = judge.rate_advice(
        verdict, "lr", "AdamW", JudgedValue(0, "AdamW", 1, plain, verdict, None), None
    )
    assert (without is None) is (verdict == "correct")


def test_references_logged_at_are_what_replace_gives():
    """The at-log copy of a step's references (built for every value logged before a step)
    equals ``dataclasses.replace``'s, hash and all, and leaves the step's own unchanged."""
    import dataclasses

    from sfdiag.run.judge import NormReferences

    refs = NormReferences(step=3, pre_step=1.0, post_step=2.0, pre_clip=1.5, micro_batches=2)
    logged = refs.logged_at(1.25, 1, True)
    expected = dataclasses.replace(refs, at_log=1.25, micro_at_log=1, scaled_at_log=True)
    assert logged == expected and hash(logged) == hash(expected)
    assert logged.partial and not refs.partial and refs.at_log is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        logged.at_log = 2.0
