"""Typed records of what a probe found: the data every report format reads.

Plain dataclasses, no torch: reports, baselines and verdict logic work on these.
``to_dict`` gives the JSON shape of docs/contract.md (schema_version 1).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

VERDICTS = ("clean", "mutated", "replaced", "cleared", "error")

#: what a mutated grad's change looks like (``sfdiag.step_audit.verdict.fingerprint``), most
#: specific first; ``unknown``: a change none of the others fits
FINGERPRINTS = ("zeroed", "scaled", "weight-decay", "adam-normalized", "sign", "unknown")

#: a logged metric's verdicts, best first (the order also settles a value that fits several
#: references at once, and a metric's verdict is its worst step's)
METRIC_VERDICTS = (
    "correct",
    "clipped",
    "averaged",
    "skipped-step",
    "local-shard",
    "loss-scaled",
    "partial-accumulation",
    "previous-step",
    "zeroed",
    "next-step",
    "base-lr",
    "other-group",
    "post-step",
    "unmatched",
)
#: the metric verdicts that say what a right number is, beside the step's own norm
NOTE_METRIC_VERDICTS = frozenset({"clipped", "averaged", "skipped-step"})
#: the metric verdicts that fail ``sfdiag run --strict``: all but ``correct`` and the notes
WRONG_METRIC_VERDICTS = frozenset(METRIC_VERDICTS) - {"correct"} - NOTE_METRIC_VERDICTS


def _num(value: float | None) -> float | str | None:
    """JSON has no NaN/Inf: write them as the strings "nan", "inf", "-inf"."""
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


@dataclass(frozen=True)
class ParamFinding:
    """One parameter, summarised over every step of a probe."""

    name: str
    shape: tuple[int, ...]
    verdict: str  # one of VERDICTS but "error"
    pre_step_grad_norm: float  # median over steps
    post_step_grad_norm: float
    max_rel_change: float | None  # max |post - pre| / |pre| (forensics only, else None)
    fingerprint: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "verdict": self.verdict,
            "pre_step_grad_norm": _num(self.pre_step_grad_norm),
            "post_step_grad_norm": _num(self.post_step_grad_norm),
            "max_rel_change": _num(self.max_rel_change),
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float | None  # None where the loss is unknown (sfdiag run)
    pre_step_grad_norm: float
    post_step_grad_norm: float
    params_mutated: int  # params whose grad changed in place, was replaced or cleared
    # sfdiag run, where the script clipped every grad of the optimizer before this step: the
    # norm the clipping call measured (the gradient's, before clipping scaled it) and whether
    # it scaled them down (the pre-step norm is then the clipped one)
    pre_clip_grad_norm: float | None = None
    clipped: bool = False

    @property
    def ratio(self) -> float:
        return ratio(self.post_step_grad_norm, self.pre_step_grad_norm)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "step": self.step,
            "loss": _num(self.loss),
            "pre_step_grad_norm": _num(self.pre_step_grad_norm),
            "post_step_grad_norm": _num(self.post_step_grad_norm),
            "params_mutated": self.params_mutated,
        }
        if self.pre_clip_grad_norm is not None:
            out["pre_clip_grad_norm"] = _num(self.pre_clip_grad_norm)
            out["clipped"] = self.clipped
        return out


def ratio(post: float, pre: float) -> float:
    """post / pre, with 0/0 = 1 (nothing moved) and x/0 = inf."""
    if pre == 0:
        return 1.0 if post == 0 else math.inf
    return post / pre


@dataclass(frozen=True)
class RankResult:
    """One rank's view of an optimizer in a multi-rank job (``sfdiag run``)."""

    rank: int
    verdict: str
    pre_step_grad_norm: float  # median over the audited steps, of this rank's grads
    post_step_grad_norm: float
    agrees: bool | None = None  # its whole grads equal rank 0's (None: not compared)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "verdict": self.verdict,
            "pre_step_grad_norm": _num(self.pre_step_grad_norm),
            "post_step_grad_norm": _num(self.post_step_grad_norm),
            "agrees": self.agrees,
        }


@dataclass(frozen=True)
class NotAudited:
    """Steps of an optimizer that ``sfdiag run`` could not see: ``why`` (``torch.compile``:
    traced into a graph its hooks cannot break, ``fullgraph=True``), how many (``steps``)
    of its ``of`` in all; None where the optimizer keeps no count of its own steps."""

    why: str
    steps: int | None
    of: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"why": self.why, "steps": self.steps, "of": self.of}


@dataclass(frozen=True)
class OptimizerResult:
    optimizer: str  # the config's unique label
    cls: str  # "module:Class"
    verdict: str
    pre_step_grad_norm: float = math.nan
    post_step_grad_norm: float = math.nan
    norm_ratio: float = math.nan
    params_mutated: int = 0
    params_with_grad: int = 0
    fingerprint: str | None = None
    advice: str | None = None
    error: str | None = None
    state_bytes_per_element: float | None = None
    steps: tuple[StepRecord, ...] = ()
    params: tuple[ParamFinding, ...] = ()
    # clean, but the grads held nothing but NaN (or Inf, or zeros) at every audited step:
    # bits compared equal (NaN equals NaN), so the audit could not tell a change from none
    undetermined: bool = False
    # a multi-rank job only: one entry per rank (past 64 ranks, the ranks that differ)
    per_rank: tuple[RankResult, ...] | None = None
    # ... and past 64 ranks, min / median / max of the ranks' local pre-step norms
    per_rank_summary: dict[str, float] | None = None
    # sfdiag run: steps no hook saw (the verdict is over the others); None: every step seen
    not_audited: NotAudited | None = None
    # sfdiag run, a script that clips: the median of the norms its clipping calls measured
    # (the gradient's, before clipping), and at how many audited steps they scaled the grads
    pre_clip_grad_norm: float | None = None
    clipped_steps: int = 0

    @property
    def flagged(self) -> bool:
        return self.verdict != "clean"

    def to_dict(self) -> dict[str, Any]:
        out = {
            "optimizer": self.optimizer,
            "class": self.cls,
            "flagged": self.flagged,
            "verdict": self.verdict,
            "undetermined": self.undetermined,
            "pre_step_grad_norm": _num(self.pre_step_grad_norm),
            "post_step_grad_norm": _num(self.post_step_grad_norm),
            "norm_ratio": _num(self.norm_ratio),
            "params_mutated": self.params_mutated,
            "params_with_grad": self.params_with_grad,
            "fingerprint": self.fingerprint,
            "advice": self.advice,
            "error": self.error,
            "state_bytes_per_element": _num(self.state_bytes_per_element),
            "steps": [s.to_dict() for s in self.steps],
            "params": [p.to_dict() for p in self.params],
        }
        if self.per_rank is not None:
            out["per_rank"] = [r.to_dict() for r in self.per_rank]
        if self.per_rank_summary is not None:
            out["per_rank_summary"] = {k: _num(v) for k, v in self.per_rank_summary.items()}
        if self.not_audited is not None:
            out["not_audited"] = self.not_audited.to_dict()
        if self.pre_clip_grad_norm is not None:
            out["pre_clip_grad_norm"] = _num(self.pre_clip_grad_norm)
            out["clipped_steps"] = self.clipped_steps
        return out


@dataclass(frozen=True)
class MetricExample:
    """One judged step of a logged metric, with the references it was judged against:
    a gradient norm's ``pre_clip``, ``pre_step``, ``post_step``; a learning rate's
    ``applied``, ``base``, ``next_step``."""

    step: int
    logged: float
    references: tuple[tuple[str, float | None], ...] = ()

    def __getitem__(self, key: str) -> float | None:
        return dict(self.references)[key]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "logged": _num(self.logged)}
        out.update((key, _num(value)) for key, value in self.references)
        return out


#: the most points a metric's series keeps for its plot
SERIES_POINTS = 2048


@dataclass
class MetricSeries:
    """A logged metric's judged steps, for ``sfdiag run --plot``: the step, the logged
    value, the true one (the gradient's norm; a rate's applied rate) and the other
    reference drawn beside it (the post-step norm; the base rate). At most ``cap``
    points: past it, every other point goes and only every ``stride``-th value is kept,
    so a long run keeps evenly spaced points in bounded memory. Not part of the JSON."""

    cap: int = SERIES_POINTS
    stride: int = 1
    seen: int = 0
    steps: array = field(default_factory=lambda: array("q"))
    logged: array = field(default_factory=lambda: array("d"))
    true: array = field(default_factory=lambda: array("d"))
    other: array = field(default_factory=lambda: array("d"))
    skipped: array = field(default_factory=lambda: array("q"))  # steps the scaler skipped

    def add(
        self, step: int, logged: float, true: float, other: float | None, skipped: bool = False
    ) -> None:
        if skipped and len(self.skipped) < self.cap and step not in self.skipped[-1:]:
            self.skipped.append(step)  # every one of them: they are few, and each matters
        if self.seen % self.stride == 0:
            self.steps.append(step)
            self.logged.append(logged)
            self.true.append(true)
            self.other.append(math.nan if other is None else other)
            if len(self.steps) > self.cap:
                for values in (self.steps, self.logged, self.true, self.other):
                    values[:] = values[::2]
                self.stride *= 2
        self.seen += 1

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class MetricResult:
    """A metric the script logged (``sfdiag run``), judged at every step it was logged."""

    name: str
    quantity: str  # grad_norm
    logger: str  # tensorboard | wandb | mlflow | lightning | transformers
    optimizer: str | None  # the label of the optimizer whose step it belongs to
    steps_judged: int
    verdict: str  # see sfdiag.run.judge.METRIC_VERDICTS
    matches: str | None  # the reference the worst step equals: pre-clip, pre-step, ...
    logged_median: float
    true_median: float
    ratio: float  # logged_median / true_median
    advice: str | None = None
    examples: tuple[MetricExample, ...] = ()
    scope: str | None = None  # the parameter or module it measures; None: the whole model
    nearest: str | None = None  # unmatched: the closest reference
    nearest_ratio: float | None = None  # unmatched: logged / that reference
    # every judged step, thinned (for the plot; not in the JSON)
    series: MetricSeries | None = field(default=None, compare=False, repr=False)

    @property
    def wrong(self) -> bool:
        return self.verdict in WRONG_METRIC_VERDICTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "quantity": self.quantity,
            "logger": self.logger,
            "optimizer": self.optimizer,
            "scope": self.scope,
            "steps_judged": self.steps_judged,
            "verdict": self.verdict,
            "matches": self.matches,
            "logged_median": _num(self.logged_median),
            "true_median": _num(self.true_median),
            "ratio": _num(self.ratio),
            "nearest": self.nearest,
            "nearest_ratio": _num(self.nearest_ratio),
            "advice": self.advice,
            "examples": [e.to_dict() for e in self.examples],
        }


#: the most steps a finding remembers for the plot
FINDING_STEPS = 1024

#: schedule-free mode findings of ``sfdiag run`` (docs/contract.md)
FINDING_KINDS = (
    "eval-in-train-mode",
    "checkpoint-in-train-mode",
    "batchnorm-stats",
    "step-in-eval-mode",
    "double-warmup",
    "scheduler-on-skipped-step",
)
#: the findings that fail ``sfdiag run --strict`` (the others are warnings)
FAILING_FINDINGS = frozenset(
    {"eval-in-train-mode", "checkpoint-in-train-mode", "step-in-eval-mode"}
)


@dataclass(frozen=True)
class Finding:
    """Something a script did with a schedule-free optimizer in the wrong mode."""

    kind: str  # one of FINDING_KINDS
    optimizer: str
    first_step: int  # the optimizer's last finished step when it first happened (-1: none yet)
    count: int
    advice: str
    gap: float | None = None  # eval-in-train-mode: ||x - y|| / ||x|| (the largest seen)
    # the steps it happened at, the first FINDING_STEPS of them (for the plot; not in JSON)
    steps: tuple[int, ...] = field(default=(), compare=False, repr=False)

    @property
    def failing(self) -> bool:
        return self.kind in FAILING_FINDINGS

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "optimizer": self.optimizer,
            "first_step": self.first_step,
            "count": self.count,
        }
        if self.kind == "eval-in-train-mode":
            out["gap"] = _num(self.gap)
        out["advice"] = self.advice
        return out


@dataclass(frozen=True)
class DistributedInfo:
    """A multi-rank job, audited as one (``sfdiag run`` under torchrun or ``--nproc``)."""

    world_size: int
    backend: str | None  # the script's process group's backend (None: it made none)
    strategy: str  # ddp | fsdp | mixed | none
    ranks_agree: bool | None  # whole grads equal on every rank (None: never compared)
    disagreements: tuple[str, ...] = ()  # "rank 1 differs from rank 0 at step 0 (fc.weight)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "strategy": self.strategy,
            "ranks_agree": self.ranks_agree,
            "disagreements": list(self.disagreements),
        }


@dataclass(frozen=True)
class ProbeReport:
    config: dict[str, Any]
    results: tuple[OptimizerResult, ...]
    sfdiag_version: str
    torch_version: str
    interrupted: bool = False  # Ctrl-C: results holds the rows finished so far
    timing: dict[str, float] = field(default_factory=dict)
    # ``sfdiag run`` only (None in a probe): the gradient metrics the script logged
    metrics: tuple[MetricResult, ...] | None = None
    # a multi-rank job only
    distributed: DistributedInfo | None = None
    # ``sfdiag run`` only: schedule-free mode findings
    findings: tuple[Finding, ...] | None = None
    # where a probe ran, ``device: auto`` resolved ("cpu", "cuda"); None where unknown
    device: str | None = None

    @property
    def any_flagged(self) -> bool:
        return any(r.flagged for r in self.results)

    @property
    def any_wrong_metric(self) -> bool:
        return any(m.wrong for m in self.metrics or ())

    def to_pandas(self, kind: str = "results") -> Any:
        """One table of the report as a pandas DataFrame: ``results`` (a row per optimizer),
        ``steps``, ``params``, ``metrics`` or ``findings`` (see ``sfdiag.report.frames``)."""
        from sfdiag.report.frames import to_frame

        return to_frame(self, kind)

    @property
    def any_failing_finding(self) -> bool:
        return any(f.failing for f in self.findings or ())

    @property
    def ranks_disagree(self) -> bool:
        return self.distributed is not None and self.distributed.ranks_agree is False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "sfdiag_version": self.sfdiag_version,
            "torch_version": self.torch_version,
            "config": self.config,
            "results": [r.to_dict() for r in self.results],
        }
        if self.metrics is not None:
            out["metrics"] = [m.to_dict() for m in self.metrics]
        if self.distributed is not None:
            out["distributed"] = self.distributed.to_dict()
        if self.findings is not None:
            out["findings"] = [f.to_dict() for f in self.findings]
        if self.interrupted:
            out["interrupted"] = True
        if self.timing:
            out["timing"] = dict(self.timing)
        return out


# -- sfdiag check: a baseline comparison ----------------------------------------------

CHECK_SCHEMA_VERSION = 1  # of ``sfdiag check --format json``
CHECK_RTOL = 1e-4  # default relative tolerance on every step's grad norms
CHECK_ATOL = 1e-12


def json_safe(value: Any) -> Any:
    """A JSON-safe copy, as it reads back from a baseline file (tuples -> lists,
    non-finite floats -> "nan"/"inf"/"-inf" as in the JSON report, other objects -> str)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass(frozen=True)
class Difference:
    """One thing that moved between the baseline and this run."""

    optimizer: str | None  # None: the whole run (config, versions)
    what: str  # human words: "verdict", "post-step grad norm (worst: step 3)", "config: steps"
    baseline_value: Any
    current_value: Any
    allowed: float | None  # relative tolerance for norms; None = must match exactly
    regression: bool
    kind: str = ""  # machine words: config, version, added, missing, class, verdict, ...
    change: float | None = None  # signed relative change of a norm, (now - then) / |then|
    step: int | None = None  # the (worst) step of a norm difference

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "kind": self.kind,
            "what": self.what,
            "step": self.step,
            "baseline": json_safe(self.baseline_value),
            "current": json_safe(self.current_value),
            "change": json_safe(self.change),
            "allowed": json_safe(self.allowed),
            "regression": self.regression,
        }


@dataclass(frozen=True)
class CheckResult:
    differences: list[Difference] = field(default_factory=list)
    optimizers: tuple[str, ...] = ()  # every label in the baseline or this run, in order
    baseline_path: str | None = None
    rtol: float = CHECK_RTOL
    atol: float = CHECK_ATOL

    @property
    def regressions(self) -> list[Difference]:
        return [d for d in self.differences if d.regression]

    @property
    def regressed(self) -> bool:
        return any(d.regression for d in self.differences)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": CHECK_SCHEMA_VERSION,
            "regressed": self.regressed,
            "baseline": self.baseline_path,
            "rtol": self.rtol,
            "atol": self.atol,
            "differences": [d.to_dict() for d in self.differences],
        }
