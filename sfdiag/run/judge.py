"""Pure judgement of the gradient metrics a training script logs.

Logged values and the reference norms ``sfdiag run`` measured at the same optimizer
step go in; metric verdicts, with advice, come out. No torch here, no I/O: the taps
and hooks of ``sfdiag.run`` only record.

Which names are gradient metrics: a name whose last ``/``-part reads as a gradient
norm (``grad_norm``, ``gradient_norm``, ``grad_2.0_norm_total``, ``gnorm``,
``train/grad_norm``, ``GradNorm``...), or whose part before the last does and whose
last part names a parameter or module (``grad_2.0_norm/net.0.weight``, Lightning's
``grad_norm`` dict), plus what ``--metric`` globs add. Losses, learning rates,
counters and timings are never judged (unless an exact ``--metric`` name asks).

References of one step (docs/contract.md): ``pre-clip`` (the norm a clipping call
measured), ``pre-step`` (the step pre-hook), ``post-clip`` (the pre-step norm, where
clipping shrank the grads) and ``post-step`` (the post-hook). A value's verdict is the
first of ``METRIC_VERDICTS`` that fits; a metric's is its worst step's.
"""

from __future__ import annotations

import math
import statistics
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sfdiag.results import METRIC_VERDICTS, MetricExample, MetricResult, MetricSeries

_RANK = {v: i for i, v in enumerate(METRIC_VERDICTS)}

DEFAULT_RTOL = 1e-3
#: example steps kept per metric in the report
EXAMPLES = 4


@dataclass(frozen=True)
class NormReferences:
    """The true norms of one optimizer step, over the metric's scope (model or parameter)."""

    step: int
    pre_step: float
    post_step: float
    pre_clip: float | None = None  # the norm a clip call measured before clipping
    clipped: bool = False  # clipping shrank the grads: the pre-step norm is post-clip
    local_shard: float | None = None  # this rank's shard only (distributed runs)
    # the grads as they were when the value was logged (logged between a backward and this
    # step: whole-model metrics only), how many backward passes had run in the step by
    # then, and whether the loss scale was still in them (before scaler.unscale_)
    at_log: float | None = None
    micro_at_log: int | None = None
    scaled_at_log: bool = False
    micro_batches: int | None = None  # backward passes that made this step's gradient
    loss_scale: float | None = None  # a GradScaler's scale in force at this step
    next_scale: float | None = None  # ... and after its update(), where it changed
    skipped: bool = False  # the scaler skipped this step (found inf/NaN): step() never ran
    # earlier steps' true norms a value may lag behind by: (step, norm), the step before
    # first (read only for a value that fits nothing else)
    earlier: tuple[tuple[int, float], ...] = ()

    @property
    def true(self) -> float:
        """The gradient's norm: pre-clip where the script clipped, else pre-step."""
        return self.pre_clip if self.pre_clip is not None else self.pre_step

    @property
    def other(self) -> float:
        """The reference drawn beside the true one: what a read after ``step()`` sees."""
        return self.post_step

    @property
    def partial(self) -> bool:
        """Logged before the step's last backward: the grads held a partial sum then."""
        return (
            self.micro_at_log is not None
            and self.micro_batches is not None
            and 0 < self.micro_at_log < self.micro_batches
        )

    def scales(self) -> list[tuple[str, float]]:
        """The factors a still-scaled norm is off by: the scale in force; where update()
        changed it, the scale after it, and the two's ratio (a norm unscaled by the new
        scale: off by 2x on the steps where the scale changes)."""
        if self.loss_scale is None or not self.loss_scale > 0 or self.loss_scale == 1:
            return []
        out = [("loss-scale", self.loss_scale)]
        after = self.next_scale
        if after is not None and after > 0 and after != self.loss_scale:
            out += [("next-scale", after), ("scale-change", self.loss_scale / after)]
        return out

    def logged_at(self, at_log: float, micro: int | None, scaled: bool) -> NormReferences:
        """These with the grads' norm as logged (``at_log``, ``*_at_log``): what
        ``dataclasses.replace`` gives, without its work a field (each logged value pays it)."""
        new = object.__new__(NormReferences)
        new.__dict__.update(self.__dict__, at_log=at_log, micro_at_log=micro, scaled_at_log=scaled)
        return new

    def named(self) -> list[tuple[str, float]]:
        """Every reference present, by the name ``matches`` uses."""
        out = []
        if self.pre_clip is not None:
            out.append(("pre-clip", self.pre_clip))
        out.append(("pre-step", self.pre_step))
        if self.local_shard is not None:
            out.append(("local-shard", self.local_shard))
        if self.at_log is not None:
            out.append(("at-log", self.at_log))
        out += [(name, self.true * factor) for name, factor in self.scales()]
        out.append(("post-step", self.post_step))
        return out

    def example(self) -> tuple[tuple[str, float | None], ...]:
        """What the report's examples show of these references."""
        out: list[tuple[str, Any]] = [
            ("pre_clip", self.pre_clip),
            ("pre_step", self.pre_step),
            ("post_step", self.post_step),
        ]
        if self.at_log is not None:
            out.append(("at_log", self.at_log))
        if self.loss_scale is not None:
            out.append(("loss_scale", self.loss_scale))
        if self.micro_batches is not None:
            out.append(("micro_batches", self.micro_batches))
        if self.skipped:
            out.append(("skipped", True))
        return tuple(out)


@dataclass(frozen=True)
class RateReferences:
    """The learning rates of one optimizer step and param group."""

    step: int
    applied: float  # the rate the update used: the schedule-free warmup's, else group["lr"]
    base: float  # group["lr"]
    next_applied: float | None = None  # the following step's applied rate, where known
    scaled_by: str | None = None  # a factor the optimizer applies on top (Prodigy's "d")
    next_base: float | None = None  # the following step's group["lr"], where known
    # what moved group["lr"] on between this step and the logging call: "scheduler" (an
    # LRScheduler.step()), "write" (the script set param_groups[i]["lr"]), None: nothing
    advanced_by: str | None = None
    group: int = 0  # the param group the metric's name says
    others: tuple[tuple[int, float], ...] = ()  # the other groups' applied rates: (group, rate)

    @property
    def true(self) -> float:
        return self.applied

    @property
    def other(self) -> float:
        """The reference drawn beside the true one: the base rate."""
        return self.base

    def named(self) -> list[tuple[str, float]]:
        out = [("applied", self.applied), ("base-lr", self.base)]
        if self.next_applied is not None:
            out.append(("next-step", self.next_applied))
        if self.next_base is not None and self.next_base != self.next_applied:
            out.append(("next-step base", self.next_base))
        return out

    def example(self) -> tuple[tuple[str, float | None], ...]:
        return (("applied", self.applied), ("base", self.base), ("next_step", self.next_applied))


def judge_rate(logged: float, refs: RateReferences, rtol: float) -> tuple[str, str | None]:
    """(verdict, the reference it equals) for one logged learning rate. A value that is
    both its step's base rate and the next step's rate (a warmup can make them meet) is
    read as the base rate: the reading that needs no shift in steps."""
    if close(logged, refs.applied, rtol):
        return "correct", "applied"
    if close(logged, refs.base, rtol):
        return "base-lr", "base-lr"
    for following in (refs.next_applied, refs.next_base):
        # read after the scheduler advanced (under a warmup of the optimizer's own, the
        # next step's group["lr"] is not the rate that step applies: either is next-step)
        if following is not None and close(logged, following, rtol):
            return "next-step", "next-step"
    for group, rate in refs.others:
        if close(logged, rate, rtol):
            return "other-group", f"group {group}"
    return "unmatched", None


def close(logged: float, reference: float, rtol: float) -> bool:
    """``logged`` equals ``reference`` to a relative ``rtol``; NaN equals NaN, inf only inf."""
    if math.isnan(logged) or math.isnan(reference):
        return math.isnan(logged) and math.isnan(reference)
    if math.isinf(logged) or math.isinf(reference):
        return logged == reference
    return abs(logged - reference) <= rtol * abs(reference)


def judge_value(logged: float, refs: NormReferences, rtol: float) -> tuple[str, str | None]:
    """(verdict, the reference it equals) for one logged value; the first that fits wins
    (``METRIC_VERDICTS``' order: a value that fits a right reference is never wrong)."""
    verdict, matches = _judge_value(logged, refs, rtol)
    if refs.skipped and verdict in ("correct", "clipped"):
        # the scaler skipped this step: inf or NaN logged for it is its gradient's norm
        return "skipped-step", matches
    return verdict, matches


def _judge_value(logged: float, refs: NormReferences, rtol: float) -> tuple[str, str | None]:
    if refs.pre_clip is not None and close(logged, refs.pre_clip, rtol):
        return "correct", "pre-clip"
    if close(logged, refs.pre_step, rtol):
        # where clipping shrank the grads, the pre-step norm is the clipped one
        return ("clipped", "post-clip") if refs.clipped else ("correct", "pre-step")
    if refs.local_shard is not None and close(logged, refs.local_shard, rtol):
        return "local-shard", "local-shard"
    if refs.partial and refs.at_log is not None and close(logged, refs.at_log, rtol):
        # the grads summed so far, before the step's last backward (and scaled, if so)
        return "partial-accumulation", "at-log, loss-scaled" if refs.scaled_at_log else "at-log"
    for name, factor in refs.scales():
        if close(logged, refs.true * factor, rtol):
            return "loss-scaled", name
    if refs.scaled_at_log and refs.at_log is not None and close(logged, refs.at_log, rtol):
        return "loss-scaled", "at-log"  # the scaled gradient, clipping still to come
    for step, norm in refs.earlier:
        if close(logged, norm, rtol) and not close(norm, refs.true, rtol):
            return "previous-step", f"step {step}"
    if logged == 0 and refs.true != 0:
        return "zeroed", "zero"
    if close(logged, refs.post_step, rtol):
        return "post-step", "post-step"
    return "unmatched", None


def _distance(logged: float, reference: float) -> float:
    """How far apart on a log scale (inf where either is zero, negative or not finite)."""
    if logged > 0 and reference > 0 and math.isfinite(logged) and math.isfinite(reference):
        return abs(math.log(logged / reference))
    return 0.0 if logged == reference else math.inf


@dataclass(frozen=True)
class JudgedValue:
    """One logged value, judged against the step it belongs to."""

    step: int
    optimizer: str
    logged: float
    refs: NormReferences | RateReferences
    verdict: str
    matches: str | None

    @property
    def rank(self) -> int:
        return _RANK[self.verdict]


def judge_claimed(logged: float, optimizer: str, refs: RateReferences, rtol: float) -> JudgedValue:
    """A learning rate judged at the one step it claims (see ``sfdiag.run.metrics``)."""
    verdict, matches = judge_rate(logged, refs, rtol)
    return JudgedValue(refs.step, optimizer, logged, refs, verdict, matches)


def judge_candidates(
    logged: float, candidates: Iterable[tuple[str, NormReferences]], rtol: float
) -> JudgedValue | None:
    """The best reading of ``logged`` over the steps it may belong to.

    A value logged after ``step()`` belongs to the step that just ran; one logged between
    backward and ``step()`` to the step about to run. Which of the two is told by the
    value itself: both are candidates (per optimizer), and the best verdict wins, ties
    going to the closer reference.
    """
    best = best_candidate(logged, candidates, rtol)
    return None if best is None else JudgedValue(best[1].step, best[0], logged, *best[1:])


def best_candidate(
    logged: float, candidates: Iterable[tuple[str, NormReferences]], rtol: float
) -> tuple[str, NormReferences, str, str | None] | None:
    """``judge_candidates``' reading as (optimizer, references, verdict, matches)."""
    best: tuple[tuple[int, float], str, NormReferences, str, str | None] | None = None
    for optimizer, refs in candidates:
        verdict, matches = judge_value(logged, refs, rtol)
        if matches == "pre-step":  # the usual match: its reference without listing them all
            distance = _distance(logged, refs.pre_step)
        elif matches == "pre-clip":
            distance = _distance(logged, refs.pre_clip)
        elif matches is not None:
            distance = _distance(logged, dict(refs.named()).get(matches, refs.pre_step))
        else:
            distance = min(_distance(logged, v) for _, v in refs.named())
        # distances that differ by little are a tie: the earlier candidate keeps it
        key = (_RANK[verdict], round(distance, 2))
        if best is None or key < best[0]:
            best = (key, optimizer, refs, verdict, matches)
            if key == (0, 0.0):  # right, at its reference: no later candidate beats it
                break
    return None if best is None else best[1:]


# ---- averages over steps ------------------------------------------------------------------------
def ema_of(previous: float, window: list[float], beta: float) -> float:
    """An exponential moving average ``previous`` moved on over the steps of ``window``
    (oldest first): ``e <- beta * e + (1 - beta) * g`` at each."""
    value = previous
    for g in window:
        value = beta * value + (1.0 - beta) * g
    return value


def fit_ema(
    transitions: list[tuple[float, list[float], float]], rtol: float = DEFAULT_RTOL
) -> float | None:
    """The coefficient in (0, 1) with which one EMA moves each ``(previous, window,
    logged)`` from ``previous`` to ``logged`` over ``window``, to a relative ``rtol``; None
    where none does. Searched on a grid, then refined around its best point: over a window
    of several steps the error need not be monotone in the coefficient, nor cross zero."""
    import numpy as np

    if not transitions or not all(
        math.isfinite(v) for prev, window, logged in transitions for v in (prev, logged, *window)
    ):
        return None

    def error(beta: Any) -> Any:
        worst = 0.0
        for previous, window, logged in transitions:
            value = previous + 0.0 * beta
            for g in window:
                value = beta * value + (1.0 - beta) * g
            worst = np.maximum(worst, np.abs(value - logged) / max(abs(logged), 1e-300))
        return worst

    grid = np.linspace(0.001, 0.999, 999)
    best = int(np.argmin(error(grid)))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(48):  # golden-section search within the grid cell
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if error(a) <= error(b):
            high = b
        else:
            low = a
    beta = float((low + high) / 2)
    return beta if 0 < beta < 1 and float(error(beta)) <= rtol else None


@dataclass
class AverageFit:
    """Whether one gradient-norm metric is an average of the true per-step norms: their mean
    over the steps since it was last logged (Lightning's ``on_epoch``, a mean over a log
    interval), or an exponential moving average (``grad_norm_ema``) whose coefficient one
    fit finds for two consecutive logged values and keeps finding for the next. Such a
    metric is ``averaged``: a note, not a wrong number.

    Judged values go through ``observe`` in the order they were logged and come out, in
    that order, ready for the tally: an unmatched value that may be an EMA waits until the
    next one confirms it (or not), two values at most.
    """

    rtol: float = DEFAULT_RTOL
    previous: float = 0.0  # the last logged value (an EMA starts from 0, or from a norm)
    beta: float | None = None  # the coefficient of the EMA found so far
    # the last value's move from the one before: (previous, window, logged)
    _last: tuple[float, list[float], float] | None = None
    _queue: list[tuple[int, JudgedValue, bool]] = field(default_factory=list)  # (n, v, waits)
    _otherwise: dict[int, JudgedValue] = field(default_factory=dict)
    _count: int = 0

    def observe(
        self,
        value: JudgedValue,
        window: list[float] | None,
        otherwise: JudgedValue | None = None,
    ) -> list[JudgedValue]:
        """``window``: the true norms of the steps since the last logged value, this value's
        step last (None where they are not all known, or the value fits its own step).
        ``otherwise``: what an unmatched value is where it is no average (an earlier step's
        norm: a right reading comes first)."""
        if otherwise is not None:
            self._otherwise[self._count] = otherwise
        n = self._count
        self._count += 1
        move = (self.previous, window, value.logged) if window else None
        self.previous = value.logged
        reading, confirms = None, 0
        if value.verdict == "unmatched" and move is not None:
            reading, confirms = self._reading(move)
        self._last = move
        # the values the moves started from are of the same EMA: the one before this (a
        # move by the coefficient known), and the one before that (one found for two moves)
        self._queue = [
            (i, _averaged(v, "ema"), False) if w and i >= n - confirms else (i, v, w)
            for i, v, w in self._queue
        ]
        waits = value.verdict == "unmatched" and reading is None and move is not None
        self._queue.append((n, _averaged(value, reading) if reading else value, waits))
        # only the next value can confirm this one or the one before: older ones are final
        self._queue = [(i, v, w and i >= n - 1) for i, v, w in self._queue]
        ready = []
        while self._queue and not self._queue[0][2]:
            i, v, _ = self._queue.pop(0)
            ready.append(self._final(i, v))
        return ready

    def observe_matched(self, logged: float) -> bool:
        """``observe`` of a value that fits its own step (no window, no other reading) where
        nothing waits: its bookkeeping alone, and True: the value is ready for the tally as
        judged. False where values wait (then ``observe`` it)."""
        if self._queue:
            return False
        self._count += 1
        self._last = None
        self.previous = logged
        return True

    def _final(self, i: int, value: JudgedValue) -> JudgedValue:
        otherwise = self._otherwise.pop(i, None)
        return otherwise if otherwise is not None and value.verdict == "unmatched" else value

    def _reading(self, move: tuple[float, list[float], float]) -> tuple[str | None, int]:
        """(how ``move``'s value averages, how many values before it that confirms)."""
        previous, window, logged = move
        if close(logged, math.fsum(window) / len(window), self.rtol):
            return "mean", 0
        if self.beta is not None and close(logged, ema_of(previous, window, self.beta), self.rtol):
            return "ema", 1
        if self._last is not None:
            beta = fit_ema([self._last, move], self.rtol)
            if beta is not None:
                self.beta = beta
                return "ema", 2
        return None, 0

    def flush(self) -> list[JudgedValue]:
        """What still waits, as judged (the run ended before a confirmation)."""
        out = [self._final(i, v) for i, v, _ in self._queue]
        self._queue = []
        return out


def _averaged(value: JudgedValue, reading: str) -> JudgedValue:
    return JudgedValue(value.step, value.optimizer, value.logged, value.refs, "averaged", reading)


# ---- a metric over its steps -----------------------------------------------------------------
def worst(verdicts: Iterable[str]) -> str:
    return max(verdicts, key=_RANK.__getitem__, default="correct")


def nearest(value: JudgedValue) -> tuple[str, float]:
    """The reference closest to an unmatched value, and logged / reference."""
    name, ref = min(value.refs.named(), key=lambda item: _distance(value.logged, item[1]))
    return name, (value.logged / ref if ref else math.inf)


def _median(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(statistics.median(kept)) if kept else math.nan


@dataclass
class MetricTally:
    """One metric's judged steps, in constant memory but for two float arrays: the logged
    and the true value of every step (for the medians), and the few steps worth showing
    (the first, the first at each verdict, the last)."""

    logged: array = field(default_factory=lambda: array("d"))
    true: array = field(default_factory=lambda: array("d"))
    optimizers: Counter = field(default_factory=Counter)
    firsts: dict[str, JudgedValue] = field(default_factory=dict)  # verdict -> first value
    first: JudgedValue | None = None
    series: MetricSeries = field(default_factory=MetricSeries)  # for the plot
    # the last value: a JudgedValue, or its fields until one is asked for (most values are
    # never shown: building each costs more than the rest of its tally)
    _last: JudgedValue | tuple | None = None

    def add(self, value: JudgedValue) -> None:
        step, optimizer, logged = value.step, value.optimizer, value.logged
        self.add_judged(step, optimizer, logged, value.refs, value.verdict, value.matches, value)

    def add_judged(
        self,
        step: int,
        optimizer: str,
        logged: float,
        refs: NormReferences | RateReferences,
        verdict: str,
        matches: str | None,
        value: JudgedValue | None = None,
    ) -> None:
        """``add`` of a value given by its fields (``value``: the same, where built)."""
        self.logged.append(logged)
        true = refs.true
        self.true.append(true)
        self.series.add(step, logged, true, refs.other, getattr(refs, "skipped", False))
        self.optimizers[optimizer] += 1
        if verdict not in self.firsts or self.first is None:
            if value is None:
                value = JudgedValue(step, optimizer, logged, refs, verdict, matches)
            self.firsts.setdefault(verdict, value)
            if self.first is None:
                self.first = value
        self._last = value or (step, optimizer, logged, refs, verdict, matches)

    @property
    def last(self) -> JudgedValue | None:
        if isinstance(self._last, tuple):
            self._last = JudgedValue(*self._last)
        return self._last

    @property
    def count(self) -> int:
        return len(self.logged)

    @property
    def verdict(self) -> str:
        return worst(self.firsts)

    def examples(self, keep: int = EXAMPLES) -> tuple[MetricExample, ...]:
        """The first step, the first at the worst verdict, the first at each other verdict,
        the last: at most ``keep``, in step order."""
        if self.first is None or self.last is None:
            return ()
        by_rank = sorted(self.firsts.values(), key=lambda v: -v.rank)
        chosen = {id(self.first): self.first, id(self.last): self.last}
        for value in by_rank:
            if len(chosen) >= keep:
                break
            chosen.setdefault(id(value), value)
        ordered = sorted(chosen.values(), key=lambda v: (v.step, v is self.last))
        return tuple(MetricExample(v.step, v.logged, v.refs.example()) for v in ordered)


def _squared(value: JudgedValue, rtol: float) -> str | None:
    """The name of a reference whose square the logged value is, if any."""
    for name, ref in value.refs.named():
        if ref > 0 and close(value.logged, ref * ref, rtol):
            return name
    return None


def summarize_metric(
    name: str,
    logger: str,
    tally: MetricTally,
    *,
    rtol: float = DEFAULT_RTOL,
    scope: str | None = None,
    quantity: str = "grad_norm",
) -> MetricResult:
    """A metric over every step it was judged at: worst verdict, medians, examples, advice."""
    verdict = tally.verdict
    at_worst = tally.firsts.get(verdict)
    optimizer = tally.optimizers.most_common(1)[0][0] if tally.optimizers else None
    logged_median = _median(tally.logged)
    true_median = _median(tally.true)
    if true_median == 0:
        ratio = 1.0 if logged_median == 0 else math.inf
    else:
        ratio = logged_median / true_median
    near = squared = None
    if at_worst is not None and verdict == "unmatched":
        near = nearest(at_worst)
        squared = _squared(at_worst, rtol) if quantity == "grad_norm" else None
    if quantity == "learning_rate":
        advice = rate_advice(verdict, name, optimizer, at_worst, near)
    else:
        advice = metric_advice(
            verdict,
            name,
            logger,
            optimizer,
            near=near,
            squared=squared,
            matches=at_worst.matches if at_worst is not None else None,
            refs=at_worst.refs if at_worst is not None else None,
        )
    return MetricResult(
        name=name,
        quantity=quantity,
        logger=logger,
        optimizer=optimizer,
        scope=scope,
        steps_judged=tally.count,
        verdict=verdict,
        matches=at_worst.matches if at_worst is not None else None,
        logged_median=logged_median,
        true_median=true_median,
        ratio=ratio,
        nearest=near[0] if near else None,
        nearest_ratio=near[1] if near else None,
        advice=advice,
        examples=tally.examples(),
        series=tally.series,
    )


# ---- advice ----------------------------------------------------------------------------------
# Where to read a gradient norm instead, by the logger that carried the wrong one.
_READ_IT_HERE = {
    "lightning": (
        "compute it in on_before_optimizer_step "
        "(lightning.pytorch.utilities.grad_norm(self, norm_type=2))"
    ),
    "transformers": (
        "log the grad_norm Trainer already reports, or read it in a TrainerCallback's "
        "on_pre_optimizer_step"
    ),
}
_READ_IT_BEFORE_STEP = (
    "read it between backward() and optimizer.step() (clip_grad_norm_'s return value is "
    "the gradient's norm), or log sfdiag.GradMonitor(optimizer).last_grad_norm"
)


def metric_advice(
    verdict: str,
    name: str,
    logger: str,
    optimizer: str | None,
    *,
    near: tuple[str, float] | None = None,
    squared: str | None = None,
    matches: str | None = None,
    refs: NormReferences | None = None,
) -> str | None:
    """One sentence: what the metric is and where to read it instead; None when correct.
    ``refs``: the references of the step at the worst verdict, for the numbers it names."""
    where = _READ_IT_HERE.get(logger, _READ_IT_BEFORE_STEP)
    owner = f"{optimizer}'s " if optimizer else ""
    if verdict == "correct":
        return None
    cause = _cause_words(verdict, name, matches, refs, where)
    if cause is not None:
        return cause
    if verdict == "clipped":
        return (
            f"{name} is the norm after clipping (at most max_norm), not the gradient's: "
            "for the gradient's norm log clip_grad_norm_'s return value"
        )
    if verdict == "post-step":
        return f"{name} is read after {owner}step() changed p.grad: {where}"
    if verdict == "averaged":
        how = {"mean": "the mean since it was last logged", "ema": "an exponential moving average"}
        return (
            f"{name} is an average of the gradient's norm over steps "
            f"({how.get(matches or '', 'an average')}), not one step's norm: right as a smoothed "
            "curve; to see each step's norm, log it unaveraged"
        )
    if verdict == "local-shard":
        return (
            f"{name} is this rank's local shard only, not the global norm: use clip_grad_norm_ "
            "on the sharded parameters, or all-reduce the squared norms"
        )
    if verdict == "unmatched":
        if squared:
            return f"{name} is the square of the {squared} norm: take its square root"
        if near is not None:
            what = f"nearest is the {near[0]} norm at {_ratio_words(near[1])}"
            return (
                f"{name} equals none of the step's gradient norms ({what}): check what it computes"
            )
        return f"{name} equals none of the step's gradient norms: check what it computes"
    return f"{name}: {verdict}"


def _cause_words(
    verdict: str, name: str, matches: str | None, refs: NormReferences | None, where: str
) -> str | None:
    """The advice for the causes named beyond where a value was read (issue: loss scaling,
    accumulation, stale reads, skipped steps); None for the other verdicts."""
    step = f" (step {refs.step})" if refs is not None else ""
    if verdict == "loss-scaled":
        if matches == "scale-change" and refs is not None and refs.next_scale:
            return (
                f"{name} was divided by the loss scale after scaler.update() changed it "
                f"({refs.loss_scale:g} -> {refs.next_scale:g}){step}: unscale by the scale the "
                "loss was scaled with (scaler.get_scale() before update()), or log "
                "clip_grad_norm_'s return value after scaler.unscale_(optimizer)"
            )
        scale = f" ({refs.loss_scale:g}x)" if refs is not None and refs.loss_scale else ""
        return (
            f"{name} is read before scaler.unscale_(optimizer): the gradient's norm times the "
            f"loss scale{scale}: divide by scaler.get_scale(), or call unscale_ first "
            "(clip_grad_norm_ after unscale_ returns the true norm)"
        )
    if verdict == "partial-accumulation":
        done = ""
        if refs is not None and refs.micro_at_log is not None and refs.micro_batches is not None:
            done = f" {refs.micro_at_log} of {refs.micro_batches}"
        scaled = (
            " and still loss-scaled (before scaler.unscale_)" if refs and refs.scaled_at_log else ""
        )
        return (
            f"{name} is logged after micro-batch{done}{step}: the grads summed so far{scaled}, "
            "not the step's: log once per optimizer step, after the last backward (Lightning: "
            "on_before_optimizer_step; accelerate: under `if accelerator.sync_gradients`)"
        )
    if verdict == "previous-step":
        return (
            f"{name} is an earlier step's gradient norm ({matches or 'a lag'}), logged for a later "
            f"step{step}: it lags behind; read the norm of the step that runs: {where}"
        )
    if verdict == "zeroed":
        return (
            f"{name} is 0 where the gradient was not{step}: read after zero_grad() cleared the "
            f"grads; {where}"
        )
    if verdict == "skipped-step":
        return (
            f"{name} was logged for a step the loss scaler skipped{step} (inf/NaN gradients: "
            "step() did not run): the value is that attempt's, right; a note, unless it "
            "happens often (then lower init_scale or check the loss)"
        )
    return None


def rate_advice(
    verdict: str,
    name: str,
    optimizer: str | None,
    at_worst: JudgedValue | None,
    near: tuple[str, float] | None,
) -> str | None:
    """One sentence for a logged learning rate; None when it is the rate applied."""
    refs = at_worst.refs if at_worst is not None else None
    further = getattr(refs, "scaled_by", None)
    owner = optimizer or "the optimizer"
    matches = at_worst.matches if at_worst is not None else None
    said = _rate_words(verdict, name, owner, refs, near, matches)
    if further:  # Prodigy's d, D-Adaptation's: a factor no param group shows as a rate
        scaled = f"{owner} scales the rate it is given further by its own {further} (not judged)"
        return f"{said}; {scaled}" if said else f"{name} is the rate {owner} was given; {scaled}"
    return said


def _rate_words(
    verdict: str,
    name: str,
    owner: str,
    refs: Any,
    near: tuple[str, float] | None,
    matches: str | None = None,
) -> str | None:
    if verdict == "correct":
        return None
    if verdict == "next-step":
        step = f" (step {refs.step})" if isinstance(refs, RateReferences) else ""
        if getattr(refs, "advanced_by", None) == "write":
            return (
                f"{name} is the rate the script wrote into param_groups for the next step, "
                f"logged under the step just run{step}: it is the value you set for the next "
                "iteration: log it with that iteration's number"
            )
        return (
            f"{name} is the next step's rate, read after scheduler.step(){step}: log "
            "scheduler.get_last_lr() before scheduler.step() (or under the next step's number)"
        )
    if verdict == "skipped-step":
        step = f" (step {refs.step})" if isinstance(refs, RateReferences) else ""
        return (
            f"{name} was logged for a step the loss scaler skipped{step}: it is the rate that "
            "attempt was given (step() did not run): a note"
        )
    if verdict == "other-group":
        named = refs.group if isinstance(refs, RateReferences) else 0
        other = "another group"
        if (matches or "").startswith("group "):
            other = f"param group {matches.split()[1]}"
        return (
            f"{name} is {other}'s rate, not group {named}'s (the group its name says): log "
            f"param_groups[{named}]['lr'] under this name, or name it for the group it is"
        )
    if verdict == "base-lr":
        share = ""
        if isinstance(refs, RateReferences) and refs.base:
            share = f" (at step {refs.step}: {refs.applied / refs.base:.3g}x the base)"
        return (
            f"{name} is group['lr'], the base rate, while {owner} applied its own warmup"
            f"{share}: log param_groups[i]['scheduled_lr'] for the rate the update used"
        )
    if near is not None:
        return (
            f"{name} equals neither the rate applied at its step, the next step's, nor the "
            f"base rate (nearest is the {near[0]} rate at {_ratio_words(near[1])})"
        )
    return f"{name} equals none of the step's learning rates"


def _ratio_words(value: float) -> str:
    if not math.isfinite(value):
        return "an infinite ratio" if math.isinf(value) else "no ratio"
    return f"{value:.3g}x"


def any_wrong(metrics: Iterable[MetricResult]) -> bool:
    return any(m.wrong for m in metrics)
