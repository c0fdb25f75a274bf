"""Every optimizer a script steps, watched through torch's global step hooks.

Per optimizer instance: a ``StepAuditor`` on the sampled audit steps (the first
``AUDIT_FIRST``, then every ``AUDIT_EVERY``-th, ``AUDIT_MAX`` in all), and on **every**
step the per-parameter grad norms just before and just after ``step()``, which the
logged-metric audit judges against (``sfdiag.run.norms``). Those cost one read before
the step (and one for the values logged in a row since the backward: ``GradsRead``;
not shared with the step's, which an edit through ``.data`` may follow); after it, only
the grads whose tensor or version counter moved are read again (all of them once an audit
step has seen this optimizer change its grads: an edit through ``.data`` moves no version
counter), and only when a logged value needs them. The norms stay on the device until a
logged value needs them; the last few steps are kept.

Under ``torch.compile`` (a compiled ``step()``, as torch's tutorial compiles it, or a
compiled training step around it) dynamo traces the step's hooks with it. The hooks are
registered through ``sfdiag.step_audit.compiling.step_hook``: where the graph may break
(``fullgraph=False``, the default) they run eagerly between the graphs, with the real
grads, so every step is audited as in an eager run, for about 30 µs a step (measured
there, against skipping them under ``is_compiling()``, which leaves every compiled step
unaudited). Where it may not (``fullgraph=True``) they stay out of the graph, which
compiles as without sfdiag: the optimizer is marked ``unseen`` when dynamo traces it,
its steps from then on are reported not audited (how many, from the optimizer's own
count: ``OptimizerResult.not_audited``), and no logged value is judged against its
steps any more (one may belong to a step never seen).
"""

from __future__ import annotations

import operator
import sys
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import compress
from types import FrameType
from typing import TYPE_CHECKING, Any

from sfdiag.run.norms import (
    GradsRead,
    Norms,
    StepNorms,
    _host_float,
    _norms,
    _number,
    _own_warmup,
    steps_taken,
)
from sfdiag.run.param_names import ParamNames, _reference, _safe_names

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sfdiag.dist import Channel, Job
    from sfdiag.results import OptimizerResult
    from sfdiag.run.clipping import ClipLog
    from sfdiag.run.findings import ModeTally
    from sfdiag.run.scaler import Backwards, ScalerWatch
    from sfdiag.step_audit.auditor import StepAuditor

# Which steps are audited, per optimizer: a training run may take a million steps, and an
# audited step costs a few host syncs and a fingerprint fit per changed parameter.
AUDIT_FIRST = 20  # every one of the first steps
AUDIT_EVERY = 100  # then every 100th
AUDIT_MAX = 200  # and no more than this many in all

#: finished steps whose norms are kept per optimizer (a logged value belongs to the step
#: that just ran or to the next one)
KEPT_STEPS = 4


def audited(step: int, done: int) -> bool:
    """Whether step ``step`` (0-based) is audited, ``done`` steps having been audited."""
    return done < AUDIT_MAX and (step < AUDIT_FIRST or step % AUDIT_EVERY == 0)


# ---- one watched optimizer ------------------------------------------------------------------
@dataclass
class Watched:
    label: str
    cls: str
    ref: Callable[[], Any]
    auditor: StepAuditor
    params: list[torch.Tensor]
    names: ParamNames
    elements: int
    state_bytes_per_element: float | None = None
    # id(optimizer) while it lived: what a value logged for it is keyed by, still known
    # when it is judged after the optimizer was freed (a training function returned)
    optimizer_id: int = 0
    error: str | None = None  # sfdiag itself could not audit this optimizer
    # a compiled step() of it was traced into a graph that must not break (fullgraph=True):
    # its steps there run no hook, so they are not audited, nor judged against
    unseen: bool = False
    counted_steps: int | None = None  # the steps it counted itself, read as it was freed
    started: int = 0  # outermost step() calls begun
    auditing: bool = False  # the step() in progress is audited
    grads_change: bool = False  # an audited step saw step() change the grads
    # post-step norms are read in the post-hook, not when a logged value needs them: a
    # value judged unmatched had lost them (logged after its grads were written again)
    read_post_at_once: bool = False
    indices: list[int] = field(default_factory=list)  # the step index of each observation
    recent: deque[StepNorms] = field(default_factory=lambda: deque(maxlen=KEPT_STEPS))
    last_finished: int = -1  # the index of the last step that finished
    stepping: bool = False  # a step() is under way (a closure runs the training step in it)
    param_ids: frozenset[int] = frozenset()
    # the step in progress: its grads as step() received them, their versions, their norms
    _pre_grads: list[Any] = field(default_factory=list)
    _pre_versions: list[int] = field(default_factory=list)
    _pre_norms: Norms | None = None
    _pre_taken: bool = False
    _pre_all: bool = False  # every parameter had a grad as step() began
    _all_indices: frozenset[int] = frozenset()  # range(len(params)), kept between steps
    last_read: GradsRead | None = None  # the grads' norms read when a value was last logged
    _clip_mark: int = 0  # the clip log's length when the previous step finished
    # the grads as the last step() left them (weakly held) and their versions
    _post_refs: list[Any] = field(default_factory=list)
    _post_versions: list[int] = field(default_factory=list)
    # multi-rank jobs
    sharded: list[tuple[int, int]] = field(default_factory=list)  # DTensor grads: (i, replicas)
    saw_sharded: bool = False  # a DTensor grad was stepped
    saw_whole: bool = False  # a plain grad was stepped
    global_norms: dict[int, tuple[float, float]] = field(default_factory=dict)  # audited steps
    # audited steps whose every grad a clipping call covered: (the norm it measured, whether
    # it scaled the grads down); the table shows the gradient's norm, not the clipped one
    clip_norms: dict[int, tuple[float, bool]] = field(default_factory=dict)
    agreement_checked: bool = False
    disagreement: tuple[int, str] | None = None  # (step, parameter) where this rank differed
    # learning rates: group["lr"] as each step began; the double-warmup record (group 0)
    _pre_rates: list[tuple[Any, bool]] = field(default_factory=list)
    warmup_rows: list[tuple[int, float, float, float, bool]] = field(default_factory=list)
    # (step, base, the base of the step before, applied, own warmup on)
    peak_rate: float = 0.0
    _previous_rate: float | None = None
    # what moved the rates on after a step (``advanced_by``): group["lr"] as the last step()
    # left it (None: on a device, not read), and the last finished step when a scheduler of
    # this optimizer last stepped
    ended_rates: tuple[float | None, ...] = ()
    scheduler_after: int = -2
    # a loss scaler's part (``sfdiag.run.scaler``): the scale of the step under way, whether
    # unscale_ ran since the last step, the attempt it skipped since then (and group 0's
    # rate then), the counts of backward passes and of scaled losses at the last step's end
    step_scale: Any = None
    unscaled: bool = False
    skipped_attempt: StepNorms | None = None
    rate_at_skip: float | None = None
    backwards_at_end: int = 0
    scaled_at_end: int = 0
    skip_advances: ModeTally | None = None  # the rate moved on after a skipped step
    skips: int = 0  # attempts the scaler skipped

    def refresh_params(self) -> list[torch.Tensor]:
        """The optimizer's parameters (param groups may have grown since the last step)."""
        optimizer = self.ref()
        if optimizer is None:
            return self.params
        count = sum(len(g["params"]) for g in optimizer.param_groups)
        if count != len(self.params):
            from sfdiag.step_audit.auditor import StepAuditor

            self.params = StepAuditor.params_of(optimizer)
            self.param_ids = frozenset(id(p) for p in self.params)
        return self.params

    def take_pre(self, backwards: int = 0) -> None:
        """The grads ``step()`` is given: remember them and their norms (no host sync).
        Read here even where a value logged since the backward read the same tensors at the
        same versions: an edit through ``.data`` (a hand-written clipping) moves no version,
        and a norm read before it would make a right value logged after it look wrong."""
        import torch

        from sfdiag.dist import is_dtensor, replicas
        from sfdiag.step_audit import fused

        grads, versions, plain = fused.grads_of(self.params)  # plain: all there, no subclass
        self.sharded, self._pre_all = [], plain
        if not plain:
            kinds = {type(g) for g in grads}
            if kinds - {torch.Tensor, type(None)}:  # a DTensor among them (or a subclass)
                self.sharded = [(i, replicas(g)) for i, g in enumerate(grads) if is_dtensor(g)]
            self.saw_sharded = self.saw_sharded or bool(self.sharded)
            self._pre_all = type(None) not in kinds
        if not self.saw_whole:
            present = len(grads) if self._pre_all else sum(g is not None for g in grads)
            self.saw_whole = len(self.sharded) < present
        self.last_read = None  # the next value logged reads the grads of the next step
        self._pre_grads = grads
        self._pre_versions = versions
        self._pre_norms = _norms(grads, whole=plain)
        self._pre_taken = True

    def read_grads(self, backwards: int) -> GradsRead:
        """The grads' norms now (between backward and ``step()``), read once for the values
        logged in a row (what they are judged against first is the step's own read)."""
        self.last_read = GradsRead.of_params(self.last_read, self.params, backwards)
        return self.last_read

    def take_rates(self, optimizer: Any) -> None:
        """group["lr"] of every param group as step() begins (and whether a schedule-free
        group's own warmup is on)."""
        self._pre_rates = [
            (_number(group.get("lr", 0.0)), _own_warmup(group))
            for group in getattr(optimizer, "param_groups", ())
        ]

    def rates_after(self, optimizer: Any) -> tuple[tuple[Any, Any, str | None], ...]:
        """Per group (base, applied, scaled_by) once step() ran: a schedule-free optimizer
        records the rate its update used in ``scheduled_lr``."""
        rates = []
        groups = list(getattr(optimizer, "param_groups", ()))
        for (base, _), group in zip(self._pre_rates, groups, strict=False):
            applied = _number(group["scheduled_lr"]) if "scheduled_lr" in group else base
            rates.append((base, applied, "d" if "d" in group else None))
        self.ended_rates = tuple(_host_float(group.get("lr", 0.0)) for group in groups)
        self._note_warmup(rates)
        return tuple(rates)

    def step_ended(
        self, norms: StepNorms, backwards: Backwards | None, scalers: ScalerWatch | None
    ) -> None:
        """A step finished: its scale and backward passes onto ``norms``; the marks reset."""
        norms.loss_scale = self.step_scale
        if backwards is not None:
            norms.micro_batches = backwards.count - self.backwards_at_end
            self.backwards_at_end = backwards.count
        if scalers is not None:
            self.scaled_at_end = scalers.scaled
        self.unscaled = False
        self.skipped_attempt = None

    def skipped(self, scale: Any, backwards: int) -> StepNorms:
        """The loss scaler skipped this optimizer's step (found inf/NaN): the attempt, as
        its step would have been recorded, with the norms of the grads it was given."""
        grads = [p.grad for p in self.refresh_params()]
        pre = _norms(grads)
        norms = StepNorms(
            self.started,
            pre,
            pre,
            with_grad=frozenset(i for i, g in enumerate(grads) if g is not None),
        )
        norms.skipped, norms.loss_scale = True, scale
        self.skips += 1
        norms.micro_batches = backwards - self.backwards_at_end
        self.backwards_at_end = backwards
        self.unscaled = False
        self.skipped_attempt = norms
        groups = list(getattr(self.ref(), "param_groups", ()))
        self.rate_at_skip = _host_float(groups[0].get("lr", 0.0)) if groups else None
        # the rates it was given: a rate logged for it is judged against them
        norms.rates = tuple((_number(g.get("lr", 0.0)),) * 2 + (None,) for g in groups)
        return norms

    def note_skip_advance(self) -> None:
        """As a step begins after a skipped attempt: whether the rate moved on since that
        attempt (a scheduler stepped, or the script set it, for a step that never ran)."""
        skipped = self.skipped_attempt
        if skipped is None or self.rate_at_skip is None:
            return
        groups = list(getattr(self.ref(), "param_groups", ()))
        now = _host_float(groups[0].get("lr", 0.0)) if groups else None
        if now is not None and now != self.rate_at_skip:
            from sfdiag.run.findings import ModeTally

            if self.skip_advances is None:
                self.skip_advances = ModeTally()
            self.skip_advances.add(skipped.step)
        self.rate_at_skip = None  # once per skipped attempt

    def scaled_now(self, scalers: ScalerWatch | None) -> bool:
        """Whether the grads hold a loss scale now: a loss was scaled since the last step
        and unscale_ has not run."""
        return scalers is not None and scalers.scaled > self.scaled_at_end and not self.unscaled

    def advanced_by(self, group: int) -> str | None:
        """What moved ``group``'s rate on since the last step finished: "scheduler" (a
        scheduler of this optimizer stepped), "write" (the script set group["lr"] itself),
        or None (nothing did: a rate logged now is still the one that step was given)."""
        if self.last_finished < 0:
            return None
        if self.scheduler_after == self.last_finished:
            return "scheduler"
        groups = getattr(self.ref(), "param_groups", ())  # (torch's: a list, not copied)
        groups = groups if isinstance(groups, list) else list(groups)
        if group >= len(groups) or group >= len(self.ended_rates):
            return None
        before, now = self.ended_rates[group], _host_float(groups[group].get("lr", 0.0))
        return "write" if before is not None and now is not None and now != before else None

    def _note_warmup(self, rates: list[tuple[Any, Any, str | None]]) -> None:
        """Keep what ``findings.double_warmup`` reads: group 0's rates while its own warmup
        is on (the rates are plain floats there: schedule-free groups keep them so)."""
        if not rates or not self._pre_rates:
            return
        base, applied, _ = rates[0]
        if hasattr(base, "detach") or hasattr(applied, "detach"):
            return  # device scalars: not read in a hook
        own = self._pre_rates[0][1]
        self.peak_rate = max(self.peak_rate, float(base))
        if own:
            previous = self._previous_rate if self._previous_rate is not None else float(base)
            self.warmup_rows.append((self.started - 1, float(base), previous, float(applied), own))
        self._previous_rate = float(base)

    def coming_rates(self) -> tuple[tuple[float, float] | None, ...]:
        """Per group, (group["lr"], the rate the next step() will apply) as they stand now:
        what a rate logged after the last step of a run is the next step's rate of. A
        schedule-free group's own warmup scales the next step by (k+1)/warmup_steps
        (docs/algorithms.md); a rate on a device is not read (None)."""
        out: list[tuple[float, float] | None] = []
        for group in getattr(self.ref(), "param_groups", ()):
            base = _number(group.get("lr", 0.0))
            if hasattr(base, "detach") or not isinstance(base, (int, float)):
                out.append(None)
                continue
            factor = 1.0
            if "scheduled_lr" in group and _own_warmup(group):
                factor = (group["k"] + 1) / group["warmup_steps"]
            out.append((float(base), float(base) * factor))
        return tuple(out)

    def await_closure(self) -> None:
        """``step(closure)``: the grads are computed inside ``step()``; ``take_pre`` waits
        for the closure to return."""
        self._pre_taken = False

    def take_post(self, clips: ClipLog | None, later: bool = True) -> StepNorms | None:
        """This step's norms after ``step()``; reads only grads that moved (see module doc).

        ``clips``: the clipping calls so far; the last one since the previous step that
        covered any of this optimizer's parameters (or their grads) belongs to this step.
        ``later``: the norms of grads that moved are read only when a logged value needs
        them (``StepNorms.read_post``), not here: most steps log nothing.
        """
        if not self._pre_taken:
            return None
        from sfdiag.step_audit import fused

        self._pre_taken = False
        clip, covered = None, frozenset()
        with_grad = self._with_grad()
        if clips is not None and len(clips) > self._clip_mark:
            clip = clips.latest_since(self._clip_mark, self.param_ids, self._pre_grads)
            if clip is not None:
                count = min(len(self.params), len(self._pre_grads))
                if self.param_ids <= clip.ids:  # the common cases, in set operations
                    covered = frozenset(range(count))
                elif clip.ids.issuperset(map(id, self._pre_grads)):  # (None: the loop below)
                    covered = with_grad
                else:
                    covered = frozenset(
                        i
                        for i, (p, g) in enumerate(zip(self.params, self._pre_grads, strict=False))
                        if id(p) in clip.ids or (g is not None and id(g) in clip.ids)
                    )
        if clips is not None:
            self._clip_mark = len(clips)
        # (version 0 where there is no grad: the same as before)
        grads, versions, _ = fused.grads_of(self.params)
        pre = self._pre_norms
        if self.grads_change or len(grads) != len(self._pre_grads):
            moved = list(range(len(grads)))
        else:  # each grad replaced or at another version (in C: a thousand grads a step)
            replaced = map(operator.is_not, grads, self._pre_grads)
            edited = map(operator.ne, versions, self._pre_versions)
            moved = list(compress(range(len(grads)), map(operator.or_, replaced, edited)))
        self._pre_grads, self._pre_versions, self._pre_norms = [], [], None
        self._post_refs = fused.weakrefs_of(grads)
        self._post_versions = versions
        norms = StepNorms(self.started - 1, pre, pre, clip, covered, with_grad)
        optimizer = self.ref()
        if optimizer is not None and self._pre_rates:
            norms.rates = self.rates_after(optimizer)
        if moved:
            norms.post = None
            norms._later = (self._post_refs, versions, moved)  # (new lists each step)
            if not later or self.read_post_at_once:
                norms.read_post()
            else:
                norms._lost = self._read_post_at_once
        return norms

    def _with_grad(self) -> frozenset[int]:
        """The parameters ``step()`` was given a grad for (all, as a rule: one set kept)."""
        count = len(self._pre_grads)
        if not self._pre_all:
            return frozenset([i for i, g in enumerate(self._pre_grads) if g is not None])
        if len(self._all_indices) != count:
            self._all_indices = frozenset(range(count))
        return self._all_indices

    def _read_post_at_once(self) -> None:
        self.read_post_at_once = True

    def has_new_grads(self, probes: int = 8) -> bool:
        """Whether grads were written since the last ``step()`` left them (a backward ran:
        a value logged now belongs to the coming step). Grads set to None are not new.
        Looks at ``probes`` parameters spread over the list, not all: every logged gradient
        metric asks, a backward writes every grad, and the answer only breaks ties."""
        count = min(len(self.params), len(self._post_refs))
        refs, versions = self._post_refs, self._post_versions
        for i in range(0, count, max(1, count // probes)):
            g, ref = self.params[i].grad, refs[i]
            if g is not None and (ref is None or ref() is not g or g._version != versions[i]):
                return True
        return False

    def note_clip(self, norms: StepNorms) -> None:
        """An audited step: where a clipping call covered every grad, the norm it measured
        (read now: an audited step syncs with the device anyway) and whether it clipped."""
        clip = norms.clip
        if clip is None or not norms.with_grad or not norms.with_grad <= norms.clipped_indices:
            return
        try:
            coefficient = clip.coefficient()
            self.clip_norms[norms.step] = (clip.total_float(), coefficient < 1.0)
        except Exception:  # a norm that will not read as a number: the table shows step()'s
            pass

    def count_steps(self, param_groups: list[dict[str, Any]], state: Any) -> None:
        self.counted_steps = steps_taken(param_groups, state)

    def result(self) -> OptimizerResult:
        from sfdiag.results import StepRecord
        from sfdiag.step_audit import snapshot, verdict

        optimizer = self.ref()
        if optimizer is not None and self.elements:
            self.state_bytes_per_element = round(snapshot.state_bytes(optimizer) / self.elements, 3)
        observations = self.auditor.observations
        steps = [
            StepRecord(
                i,
                None,
                *self.global_norms.get(i, (o.pre_norm, o.post_norm)),
                o.params_mutated,
                *self.clip_norms.get(i, (None, False)),
            )
            for i, o in zip(self.indices, observations, strict=True)
        ]
        error = self.error
        if error is None and not observations and self.started:
            error = "step() raised before finishing; no step completed"
        result = verdict.summarize(
            self.label,
            self.cls,
            steps,
            [o.params for o in observations],
            error=error,
            state_bytes_per_element=self.state_bytes_per_element,
        )
        if not self.unseen:
            return result
        from sfdiag.results import NotAudited

        taken = self.counted_steps
        if optimizer is not None:
            taken = steps_taken(optimizer.param_groups, getattr(optimizer, "state", None))
        unseen = None if taken is None else max(taken - self.started, 0)
        return replace(result, not_audited=NotAudited("torch.compile", unseen, taken))


# ---- the global hooks ---------------------------------------------------------------------------
@dataclass
class OptimizerWatch:
    """torch's global step hooks, feeding one ``Watched`` per optimizer instance.

    ``observers`` hear of every optimizer: ``adopt(entry, optimizer, frame)`` when it first
    steps (``frame``: the code that called step()), ``before(entry, optimizer)`` as each
    step starts and ``after(entry, optimizer)`` when it finished (the logged-metric audit
    resolves what was logged meanwhile; the mode audit checks the modes). Each method is
    optional; an observer that raises is dropped, never the script's step.

    In a multi-rank job (``job``), ``channel`` is sfdiag's own link between the ranks
    (opened at the first step if the run could not open it before the script): a step
    with sharded (DTensor) grads sums their squares over the ranks, so the norms are the
    job's; an audited step compares every rank's whole grads with rank 0's (bit for
    bit, by digest) where the script runs a process group of its own.
    """

    clips: ClipLog | None = None
    observers: list[Any] = field(default_factory=list)
    job: Job | None = None
    channel: Channel | None = None
    script_backend: str | None = None  # the script's own process group, once seen
    channel_error: str | None = None
    watched: list[Watched] = field(default_factory=list)
    _by_id: dict[int, Watched] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)
    _untaps: list[Callable[[], None]] = field(default_factory=list)
    # optimizers made while the watch is on (weakly held): before one first steps, a
    # gradient norm logged for its first step is read against its grads (``born``)
    _born: Any = None
    # backward passes counted, and the loss scaler's calls (``sfdiag.run.scaler``)
    backwards: Backwards | None = None
    scalers: ScalerWatch | None = None

    def install(self) -> OptimizerWatch:
        import torch.optim.optimizer as torch_optimizer

        from sfdiag.run import schedulers
        from sfdiag.run.scaler import Backwards, ScalerWatch
        from sfdiag.step_audit.compiling import step_hook

        self._handles = [  # a compiled step() runs them eagerly, or not at all (module doc)
            torch_optimizer.register_optimizer_step_pre_hook(step_hook(self._pre, self._unseen)),
            torch_optimizer.register_optimizer_step_post_hook(step_hook(self._post)),
        ]
        if self.backwards is None:  # kept across installs: the entries' marks count on it
            self.backwards = Backwards()
            self.scalers = ScalerWatch(self, self.backwards)
            self._born = weakref.WeakSet()
        self._untaps = [
            schedulers.install(self._scheduler_stepped),
            self.backwards.install(),
            self.scalers.install(),
            _note_new_optimizers(self._born),
        ]
        return self

    def born(self) -> list[Any]:
        """Optimizers made while the watch is on, none of which has stepped yet (once one
        has, an optimizer that never steps costs nothing more)."""
        if not self._born or any(w.last_finished >= 0 for w in self.watched):
            return []
        return [o for o in list(self._born) if self._by_id.get(id(o)) is None]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._untaps:
            self._untaps.pop()()

    def _scheduler_stepped(self, scheduler: Any) -> None:
        """A scheduler stepped: the rates of the optimizer it drives moved on after that
        optimizer's last finished step. (Matched by its param groups: a wrapper such as
        accelerate's optimizer shares the wrapped one's.)"""
        groups = getattr(getattr(scheduler, "optimizer", None), "param_groups", None)
        if groups is None:
            return
        for entry in self.watched:
            optimizer = entry.ref()
            if optimizer is not None and getattr(optimizer, "param_groups", None) is groups:
                entry.scheduler_after = entry.last_finished

    def results(self) -> list[OptimizerResult]:
        return [w.result() for w in self.watched]

    def _entry(self, optimizer: Any, frame: FrameType | None) -> Watched:
        from sfdiag.step_audit.auditor import StepAuditor, class_path

        entry = self._by_id.get(id(optimizer))
        if entry is not None and entry.ref() is optimizer:
            return entry
        name = type(optimizer).__name__
        self._counts[name] = self._counts.get(name, 0) + 1
        label = name if self._counts[name] == 1 else f"{name}#{self._counts[name]}"
        params = StepAuditor.params_of(optimizer)
        names = _safe_names(params, frame)
        entry = Watched(
            label=label,
            cls=class_path(optimizer),
            ref=_reference(optimizer),
            optimizer_id=id(optimizer),
            auditor=StepAuditor(names=names.names),
            params=params,
            names=names,
            elements=sum(p.numel() for p in params),
            param_ids=frozenset(id(p) for p in params),
        )
        self.watched.append(entry)
        self._by_id[id(optimizer)] = entry
        return entry

    def backward_count(self) -> int:
        return 0 if self.backwards is None else self.backwards.count

    def _pre(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        from sfdiag.step_audit.auditor import active_steps

        try:
            frame = sys._getframe(1)
            entry = self._entry(optimizer, frame)
            if entry.error is not None or active_steps(optimizer) != 1:
                return None
            if self.job is not None:
                self._join_job()
            if entry.started == 0:
                self._tell("adopt", entry, optimizer, frame)
            self._tell("before", entry, optimizer)
            entry.note_skip_advance()
            entry.auditing = audited(entry.started, len(entry.auditor.observations))
            entry.started += 1
            entry.refresh_params()
            entry.take_rates(optimizer)
            entry.stepping = True
            closure = _closure_of(args, kwargs)
            if closure is None:
                entry.take_pre(self.backward_count())
                if entry.auditing:
                    entry.auditor.pre_step(optimizer)
                return None
            # step(closure) computes the grads inside step(): read them when it returns
            entry.await_closure()
            if entry.auditing:
                entry.auditor.pre_step(optimizer)

            def closure_then_take(*a: Any, **k: Any) -> Any:
                loss = closure(*a, **k)
                try:
                    entry.take_pre(self.backward_count())
                    if entry.auditing:
                        entry.auditor.retake(optimizer)
                except Exception as exc:
                    self._give_up(optimizer, exc)
                return loss

            return _with_closure(args, kwargs, closure_then_take)
        except Exception as exc:  # never break the user's training because of sfdiag
            self._give_up(optimizer, exc)
            return None

    def _post(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        from sfdiag.step_audit.auditor import active_steps

        entry = self._by_id.get(id(optimizer))
        if entry is None or entry.error is not None or active_steps(optimizer) != 1:
            return
        entry.stepping = False
        import numpy as np

        from sfdiag.dist import ChannelError
        from sfdiag.step_audit import snapshot

        try:
            if entry.auditing:
                observations = entry.auditor.observations
                before = len(observations)
                with np.errstate(all="ignore"):  # fits on odd values must not warn in the script
                    entry.auditor.post_step(optimizer)
                if len(observations) > before:  # the outermost step() finished
                    entry.indices.append(entry.started - 1)
                    entry.auditing = False
                    if observations[-1].params_mutated:
                        entry.grads_change = True
                    if entry.state_bytes_per_element is None and entry.elements:
                        entry.state_bytes_per_element = round(
                            snapshot.state_bytes(optimizer) / entry.elements, 3
                        )
            # a job's sharded norms are summed over the ranks now, all of them together
            norms = entry.take_post(self.clips, later=self.channel is None or not entry.sharded)
            if norms is not None:
                entry.step_ended(norms, self.backwards, self.scalers)
                if entry.indices and entry.indices[-1] == norms.step:
                    entry.note_clip(norms)
                if self.channel is not None:
                    try:
                        self._across_ranks(entry, norms)
                    except ChannelError as exc:  # the job goes on; this rank stops talking
                        self.channel_error, self.channel = str(exc), None
                if not entry.unseen:  # else a logged value may belong to a step never seen
                    entry.recent.append(norms)
                entry.last_finished = norms.step
        except Exception as exc:
            self._give_up(optimizer, exc)
            return
        self._tell("after", entry, optimizer)

    def _unseen(self, optimizer: Any) -> None:
        """dynamo traced ``optimizer.step()`` into a graph that must not break: no hook
        runs in it (``sfdiag.step_audit.compiling``). Its steps there go unaudited, and from now on
        no logged value is judged against its steps: one that ran unseen may be the step
        a value belongs to. Called at trace time."""
        entry = self._entry(optimizer, sys._getframe(1))
        if entry.unseen:
            return
        entry.unseen = True
        entry.recent.clear()
        self._tell("unseen", entry, optimizer)
        # its count of steps says how many went unseen: the script may free it before the
        # report, so it is read then (the finalizer holds what the optimizer holds anyway)
        weakref.finalize(optimizer, entry.count_steps, optimizer.param_groups, optimizer.state)

    def _tell(self, event: str, *args: Any) -> None:
        for observer in list(self.observers):
            method = getattr(observer, event, None)
            if method is None:
                continue
            try:
                method(*args)
            except Exception:  # sfdiag's own bug: stop that observer, keep the training
                self.observers.remove(observer)

    # ---- multi-rank jobs ---------------------------------------------------------------
    def _join_job(self) -> None:
        """Note the script's process group; open the channel if the run could not."""
        import torch.distributed as torch_dist

        if (
            self.script_backend is None
            and torch_dist.is_available()
            and torch_dist.is_initialized()
        ):
            self.script_backend = str(torch_dist.get_backend())
        if self.channel is None and self.channel_error is None and self.script_backend:
            from sfdiag.dist import Channel

            try:
                self.channel = Channel.open(self.job)
            except Exception as exc:
                self.channel_error = f"{type(exc).__name__}: {exc}"

    def _across_ranks(self, entry: Watched, norms: StepNorms) -> None:
        """The job's norms for a step with sharded grads, and the ranks' agreement on an
        audited one. Every rank takes the same steps, so every rank calls these alike."""
        if entry.sharded:
            norms.globalize(self.channel, entry.sharded)
        audited_now = entry.indices and entry.indices[-1] == norms.step
        if not audited_now:
            return
        if entry.sharded:
            entry.global_norms[norms.step] = norms.over(None)
        if self.script_backend is not None:
            self._compare_with_rank0(entry, norms.step)

    def _compare_with_rank0(self, entry: Watched, step: int) -> None:
        """Whole (not sharded) grads must be bit-identical on every rank before step()
        (DDP's all-reduce makes them so): rank 0's digests, broadcast, against ours."""
        import torch

        sharded = {i for i, _ in entry.sharded}
        digests = [
            0 if i in sharded else d for i, d in enumerate(entry.auditor.observations[-1].digests)
        ]
        if not any(digests):  # every grad sharded (or none): nothing whole to compare
            return
        mine = torch.tensor(digests, dtype=torch.int64)
        theirs = self.channel.broadcast(mine.clone())
        entry.agreement_checked = True
        if entry.disagreement is None and not torch.equal(mine, theirs):
            index = int((mine != theirs).nonzero()[0])
            name = entry.names.names.get(id(entry.params[index]), f"param{index}")
            entry.disagreement = (step, name)

    def _give_up(self, optimizer: Any, exc: Exception) -> None:
        entry = self._by_id.get(id(optimizer))
        if entry is not None and entry.error is None:
            text = str(exc).strip().splitlines()
            from sfdiag.step_audit.verdict import SFDIAG_FAILED

            entry.error = f"{SFDIAG_FAILED}: {type(exc).__name__}: {text[0] if text else ''}"


def _note_new_optimizers(born: Any) -> Callable[[], None]:
    """``torch.optim.Optimizer.__init__`` wrapped to add each new optimizer to ``born``;
    returns the undo."""
    import functools

    import torch.optim

    from sfdiag.run.taps._hooks import Patches

    patches = Patches()
    original = torch.optim.Optimizer.__init__
    if getattr(original, "_sfdiag_tap", False):
        return patches.undo

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            born.add(self)
        except TypeError:  # not weakly referenceable: left to its first step
            pass

    init._sfdiag_tap = True  # type: ignore[attr-defined]
    patches.set(torch.optim.Optimizer, "__init__", init)
    return patches.undo


def _closure_of(args: tuple, kwargs: dict) -> Callable[..., Any] | None:
    if len(args) > 1 and callable(args[1]):
        return args[1]
    closure = kwargs.get("closure")
    return closure if callable(closure) else None


def _with_closure(args: tuple, kwargs: dict, closure: Callable[..., Any]) -> tuple[tuple, dict]:
    """The step's (args, kwargs) with its closure replaced."""
    if len(args) > 1 and callable(args[1]):
        return (args[0], closure, *args[2:]), kwargs
    return args, {**kwargs, "closure": closure}
