"""The logged-metric audit of ``sfdiag run``: what the taps hear, judged at its step.

The taps hand every scalar the script logs to ``MetricAudit.record``. A name the
selector does not pick costs one dict lookup. A picked one is kept with the norms of the
step each optimizer had last finished; the next step to finish pins its norms to it too
(so both steps it may belong to are known), and at the script's next logging call (or
when it ends) it is judged against them (``sfdiag.run.judge``) and only its tally is kept.
No step hook reads a norm to the host: on an accelerator that would wait for the device
in the middle of the training step.

Every logged value pays for this, so recording keeps little and judging goes in batches:
what a name is judged as (its quantity, the part of the model it covers, its param group)
is worked out once per name (``Tag``); what a logging call saw of the optimizers is kept
once for all the values it logged (``Moment``), each value as its tag and number; the
values whose steps are known are judged together, the references of a step built once
for all of them, and a metric's tally builds Python objects only for the values a report
shows.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sfdiag.run import judge
from sfdiag.run.judge import (
    JudgedValue,
    MetricTally,
    NormReferences,
    RateReferences,
)
from sfdiag.run.logged import Moment, Tag, same_reads
from sfdiag.run.metric_names import MetricSelector

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.results import MetricResult
    from sfdiag.run.norms import GradsRead, StepNorms
    from sfdiag.run.watch import OptimizerWatch, Watched

#: distinct names remembered as picked or not (a script that logs ever-new names must
#: not grow this without bound: past it, names are looked at afresh each time)
_NAME_CACHE = 4096
#: values waiting for their step; past this, the oldest are judged with what there is
_PENDING_MAX = 4096
#: finished steps kept per optimizer for judging averages over steps (each holds its
#: per-parameter norms: 4 bytes a parameter tensor, on the device)
AVERAGE_STEPS = 1024


def as_number(value: Any) -> Any:
    """A float, a one-element tensor (left on its device: read when judged), or None for
    anything that is not one number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    numel = getattr(value, "numel", None)
    if callable(numel) and hasattr(value, "detach"):  # torch.Tensor
        try:
            if numel() != 1:
                return None
            if value.device.type == "cpu":
                return float(value.detach().reshape(()))
            return value.detach().reshape(()).clone()
        except Exception:
            return None
    size = getattr(value, "size", None)
    if isinstance(size, int) and size == 1 and hasattr(value, "dtype"):  # numpy
        try:
            return float(value.reshape(()) if hasattr(value, "reshape") else value)
        except Exception:
            return None
    return None


def _float(value: Any) -> float:
    return float(value.item()) if hasattr(value, "item") else float(value)


#: keys of a logged dict that give the step its values belong to, as ``step=`` does
#: (nanoGPT's ``{"iter": k, ...}``, Hugging Face's W&B callback's ``train/global_step``)
STEP_KEYS = frozenset(
    {"iter", "step", "global_step", "iteration", "trainer/global_step", "train/global_step"}
)


def step_number(value: Any) -> int | None:
    """A step number as a logger is given one: a whole number (an int, an integral float,
    a one-element tensor or numpy scalar holding one); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    number = as_number(value) if not isinstance(value, float) else value
    if isinstance(number, float) and number.is_integer():
        return int(number)
    return None


def logged_step(step: Any, items: list[tuple[Any, Any]]) -> int | None:
    """The step the logging call names: its ``step=`` argument, else a step key among the
    logged items."""
    if step is not None:
        return step_number(step)
    for name, value in items:
        if name in STEP_KEYS:
            return step_number(value)
    return None


def _rate_references(
    step: int,
    rates: Any,
    following: Any,
    advanced: str | None,
    after: int,
    group: int = 0,
    norms: StepNorms | None = None,
) -> RateReferences:
    """``RateReferences`` of ``step`` from its (base, applied, scaled_by) and the following
    step's; what moved the rate on counts only for the step that had finished (``after``);
    ``norms``: the step's record, for the other groups' rates."""
    others = ()
    if norms is not None:
        found = ((j, norms.rate(j)) for j in range(len(norms.rates)) if j != group)
        others = tuple((j, r[1]) for j, r in found if r is not None)
    return RateReferences(
        step=step,
        applied=rates[1],
        base=rates[0],
        next_applied=following[1] if following else None,
        scaled_by=rates[2],
        next_base=following[0] if following else None,
        advanced_by=advanced if step == after else None,
        group=group,
        others=others,
    )


def _rates_at(
    step: int,
    pinned: dict[int, StepNorms],
    after: int,
    coming: tuple[float, float] | None,
    group: int,
) -> tuple[float, float, str | None] | None:
    """``group``'s rates at ``step``: a pinned step's, or the coming step's as they stood
    when logged where no step ran after the last finished one (yet)."""
    here = pinned.get(step)
    if here is not None:
        return here.rate(group)
    if step == after + 1 and coming is not None:
        return (coming[0], coming[1], None)
    return None


class Candidates:
    """The (optimizer, references) a gradient norm may equal, in order, each built when the
    judging first reaches it: most values match the first at its reference, and a step's
    references over a thousand grads take a tenth of a millisecond to build."""

    def __init__(self) -> None:
        self._plans: list[tuple[str, StepNorms, Any, Any]] = []
        self._built: list[tuple[str, NormReferences]] = []

    def plan(self, label: str, norms: StepNorms, scope: Any, read: Any) -> None:
        """A candidate: ``norms``' references over ``scope``, and, where ``read`` is one
        (total, micro-batches, scaled), as logged at that read."""
        self._plans.append((label, norms, scope, read))

    def __iter__(self) -> Iterator[tuple[str, NormReferences]]:
        for k, (label, norms, scope, read) in enumerate(self._plans):
            if k == len(self._built):
                refs = norms.references(scope)
                if read is not None:
                    total, micro, scaled = read
                    refs = refs.logged_at(_float(total), micro, scaled)
                self._built.append((label, refs))
            yield self._built[k]


@dataclass
class MetricAudit:
    """The sink every tap records into (see the module doc)."""

    watch: OptimizerWatch
    selector: MetricSelector = field(default_factory=MetricSelector)
    rtol: float = judge.DEFAULT_RTOL
    active: bool = True
    _tags: dict[tuple[str, str], Tag | None] = field(default_factory=dict)
    _pending: list[Moment] = field(default_factory=list)  # waiting for a step to finish
    _waiting: int = 0  # the values in ``_pending``
    _ready: list[Moment] = field(default_factory=list)  # their steps known: to judge
    _tallies: dict[tuple[str, str], MetricTally] = field(default_factory=dict)
    _scopes: dict[tuple[str, str], str | None] = field(default_factory=dict)
    _quantities: dict[tuple[str, str], str] = field(default_factory=dict)
    _module_aliases: dict[tuple[int, int], dict[str, tuple[int, ...]]] = field(default_factory=dict)
    # averages over steps: each whole-model gradient-norm metric's fit and the step it was
    # last logged at; each optimizer's finished steps, the last AVERAGE_STEPS of them
    _averages: dict[tuple[str, str], judge.AverageFit] = field(default_factory=dict)
    _last_steps: dict[tuple[str, str], int] = field(default_factory=dict)
    _history: dict[int, deque[StepNorms]] = field(default_factory=dict)
    # an optimizer not watched yet (it has not stepped), by id: its grads' last at-log read
    _unwatched_reads: dict[int, GradsRead] = field(default_factory=dict)

    # ---- what the taps call -----------------------------------------------------------------
    def is_active(self) -> bool:
        return self.active

    def picks(self, name: str) -> str | None:
        """The quantity ``name`` is judged as (``grad_norm``, ``learning_rate``), or None."""
        tag = self._tag("", name)
        return None if tag is None else tag.quantity

    def _tag(self, logger: str, name: Any) -> Tag | None:
        """``name``'s tag where the selector picks it, else None."""
        key = (logger, name)
        try:
            return self._tags[key]
        except KeyError:
            pass
        except TypeError:  # not hashable: not a name
            return None
        tag = None
        if isinstance(name, str):
            quantity = self.selector.quantity(name)
            tag = None if quantity is None else Tag(logger, name, quantity)
        if len(self._tags) < _NAME_CACHE:
            self._tags[key] = tag
        return tag

    def record(
        self,
        logger: str,
        items: Iterable[tuple[Any, Any]],
        module: Any = None,
        step: Any = None,
    ) -> None:
        """Keep the logged (name, value) pairs that are gradient norms or learning rates;
        ``step``: the step number the logger was given (if any). Never raises."""
        try:
            items = list(items)
            moment = None
            for name, value in items:
                tag = self._tag(logger, name)
                if tag is None:
                    continue
                number = as_number(value)
                if number is None:
                    continue
                if moment is None:
                    moment = self._moment(items, module, step)
                if tag.quantity == "learning_rate":
                    if tag.group not in moment.groups_read:
                        moment = self._read_rates(moment, tag.group)
                else:
                    if not moment.at_log_read and tag.hint is None:
                        # once per logging call, for its whole-model gradient metrics (a
                        # parameter's norm, as Lightning logs a hundred of them, needs none)
                        moment = self._read_at_log(moment)
                    if not moment.posts_read:
                        self._read_posts(moment)
                moment.values.append((tag, number, moment.at_log_read))
                self._waiting += 1
            self._judge_ready()
            while self._waiting > _PENDING_MAX:  # never stepping: judge what there is
                oldest = self._pending[0]
                tag, number, at_log = oldest.values.pop(0)
                if not oldest.values:
                    self._pending.pop(0)
                self._waiting -= 1
                self._judge_value(oldest, tag, number, at_log, {})
        except Exception:  # a value we cannot read is not judged; the script goes on
            pass

    def _moment(self, items: list[tuple[Any, Any]], module: Any, step: Any) -> Moment:
        """The moment a logging call's values wait in: the last one, where the call sees
        what it saw (values logged in a row are judged together), else a new one."""
        label = logged_step(step, items)
        watched = self.watch.watched
        fresh = [w.last_finished < 0 or w.has_new_grads() for w in watched]
        last = self._pending[-1] if self._pending else None
        if last is not None and last.saw(label, module, fresh, watched):
            last.at_log_read = False
            last.groups_read = set()
            return last
        moment = Moment(label, weakref.ref(module) if module is not None else None, fresh)
        moment.pin(watched)
        self._pending.append(moment)
        return moment

    def _read_rates(self, moment: Moment, group: int) -> Moment:
        """Read what a learning rate of ``group`` needs as the call logs it (once a call:
        the coming step's rates and the skipped attempts; once a group: what moved the rate
        on); ``moment``, or a new one where it holds other readings."""
        watched = self.watch.watched
        coming, skips = moment.coming, moment.skips
        if not moment.groups_read:  # the call's first learning rate
            coming = tuple(w.coming_rates() for w in watched)
            skips = tuple(w.skips for w in watched)
        advanced = tuple(w.advanced_by(group) for w in watched)
        if (
            moment.coming is not None and (coming != moment.coming or skips != moment.skips)
        ) or moment.advanced.get(group, advanced) != advanced:
            moment = moment.split()
            self._pending.append(moment)
        moment.coming, moment.skips = coming, skips
        moment.advanced[group] = advanced
        moment.groups_read.add(group)
        return moment

    def _read_at_log(self, moment: Moment) -> Moment:
        """Read the at-log norms for the call's whole-model gradient norms; ``moment``, or a
        new one where it holds other readings (grads written since, or read again)."""
        at_log = self._at_log(moment.fresh)
        held = moment.at_log
        if held is not None and not same_reads(held, at_log):
            moment = moment.split()
            self._pending.append(moment)
            held = None
        if held is None:  # else the same reads (a read is kept while its grads hold)
            moment.at_log = at_log
        moment.at_log_read = True
        return moment

    def _read_posts(self, moment: Moment) -> None:
        """Before a gradient norm is kept: the grads may still be as the last step() left
        them; where a backward wrote them since, the value is most likely the coming step's
        (``_judge_norm`` reads the post-step norms early from then on only if it turns out
        to be neither)."""
        moment.posts_read = True
        for position, entry in enumerate(self.watch.watched):
            last = entry.recent[-1] if entry.recent else None
            if last is not None and last.step == entry.last_finished:
                last.read_post(logging=not moment.fresh[position])

    def _at_log(self, fresh: list[bool]) -> dict[int, tuple[Any, int | None, bool]]:
        """Per optimizer (by id) whose grads were written since its last step, or that has
        not stepped yet: the norm of its grads now (a device scalar, read when judged), the
        backward passes of the step so far, and whether they still hold the loss scale."""
        backwards = self.watch.backwards
        scalers = self.watch.scalers
        count = 0 if backwards is None else backwards.count
        out = {}
        for position, entry in enumerate(self.watch.watched):
            optimizer = entry.ref()
            if not fresh[position] or optimizer is None:  # logged after the step: no
                continue  # coming step's grads
            total = entry.read_grads(count).total()
            if total is not None:
                micro = None if backwards is None else count - entry.backwards_at_end
                out[entry.optimizer_id] = (total, micro, entry.scaled_now(scalers))
        born = self.watch.born()
        if born:
            from sfdiag.run.norms import GradsRead
            from sfdiag.step_audit.auditor import StepAuditor

            scaled = scalers is not None and scalers.scaled > 0
            for optimizer in born:
                params = StepAuditor.params_of(optimizer)
                read = GradsRead.of_params(self._unwatched_reads.get(id(optimizer)), params, count)
                self._unwatched_reads[id(optimizer)] = read
                total = read.total()
                if total is not None:
                    out[id(optimizer)] = (total, None if backwards is None else count, scaled)
        return out

    def skipped(self, entry: Watched, optimizer: Any, norms: StepNorms) -> None:
        """The loss scaler skipped ``entry``'s step: what was logged for it may be judged
        against that attempt (pinned to it; it still waits for the next step too)."""
        position = self.watch.watched.index(entry)
        self._history.setdefault(position, deque(maxlen=AVERAGE_STEPS)).append(norms)
        for moment in self._pending:
            moment.steps.setdefault(position, []).append(norms)

    def _judge_ready(self) -> None:
        """Judge the values whose steps are known: here, in the script's own logging call,
        never in a step hook (reading the norms may wait for the device)."""
        if not self._ready:
            return
        ready, self._ready = self._ready, []
        for moment in ready:
            self._judge(moment)

    # ---- what the optimizer watch calls ----------------------------------------------------
    def after(self, entry: Watched, optimizer: Any = None) -> None:
        """A step finished: what was logged before it now has both steps it may belong to
        (this one is pinned to it) and waits to be judged (see ``_judge_ready``). No
        device read here."""
        if not entry.recent or entry.recent[-1].step != entry.last_finished:
            return
        position = self.watch.watched.index(entry)
        norms = entry.recent[-1]
        history = self._history.get(position)
        if history is None:
            history = self._history[position] = deque(maxlen=AVERAGE_STEPS)
        history.append(norms.pre_only())  # nothing is read until a value needs it
        if not self._pending:
            return
        for moment in self._pending:
            moment.steps.setdefault(position, []).append(norms)
        self._ready += self._pending
        self._pending, self._waiting = [], 0

    def unseen(self, entry: Watched, optimizer: Any = None) -> None:
        """``entry``'s steps run unseen from now on (a ``step()`` compiled into a graph that
        must not break): a value waiting for its next step may belong to one never seen.
        Nothing is judged against this optimizer's steps any more (the watch keeps none)."""
        position = self.watch.watched.index(entry)
        for moment in self._pending:
            moment.steps.pop(position, None)
        self._ready += self._pending
        self._pending, self._waiting = [], 0

    def finish(self) -> tuple[MetricResult, ...]:
        """Judge what is left; every metric's result, in the order first logged."""
        self.active = False
        for moment in self._ready + self._pending:
            self._judge(moment)
        self._ready, self._pending, self._waiting = [], [], 0
        for key, fit in self._averages.items():
            for value in fit.flush():
                self._tally(key).add(value)
        return tuple(self.judged_so_far())

    def judged_so_far(self, skip: Collection[tuple[str, str]] = ()) -> list[MetricResult]:
        """Each metric's result over the values judged so far (the running tallies, read
        without changing them), but those whose (logger, name) is in ``skip``: what a
        callback warns about while training goes on."""
        return [
            judge.summarize_metric(
                name,
                logger,
                tally,
                rtol=self.rtol,
                scope=self._scopes.get((logger, name)),
                quantity=self._quantities.get((logger, name), "grad_norm"),
            )
            for (logger, name), tally in list(self._tallies.items())
            if (logger, name) not in skip and tally.count
        ]

    # ---- judging --------------------------------------------------------------------------
    def _tally(self, key: tuple[str, str]) -> MetricTally:
        """The metric's tally (made once: a new one, arrays and all, costs µs a value)."""
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = MetricTally()
        return tally

    def _judge(self, moment: Moment) -> None:
        """Judge a moment's values, in the order logged; what does not depend on a value
        (a scope's candidate references, a group's rate references) is built once."""
        shared: dict[Any, Any] = {}
        for tag, number, at_log in moment.values:
            self._judge_value(moment, tag, number, at_log, shared)

    def _judge_value(
        self, moment: Moment, tag: Tag, number: Any, at_log: bool, shared: dict[Any, Any]
    ) -> None:
        """Judge one value; ``shared``: what the values of ``moment`` judged so far built."""
        try:
            value = _float(number)
        except Exception:
            return
        if tag.quantity == "learning_rate":
            self._judge_rate(moment, tag, value, shared)
        else:
            self._judge_norm(moment, tag, value, at_log, shared)

    def _candidates(
        self, moment: Moment, hint: str | None, at_log: bool
    ) -> tuple[Candidates, list[int], str | None]:
        """The references a gradient norm of ``moment`` that names ``hint`` may equal, per
        watched optimizer and step it may belong to (the coming step first where a backward
        ran since the last), the position of each, and the scope's name where found."""
        candidates = Candidates()
        positions: list[int] = []
        scope_name = None
        reads = moment.at_log if at_log and moment.at_log is not None else {}
        for position, entry in enumerate(self.watch.watched):
            chosen = moment.steps.get(position)
            if not chosen:
                continue
            scope = self._scope(entry, hint, moment.module)
            if scope is not None:
                scope_name = hint
            fresh = position < len(moment.fresh) and moment.fresh[position]
            after = moment.after[position] if position < len(moment.after) else -1
            read = reads.get(entry.optimizer_id)
            for norms in reversed(chosen) if fresh else chosen:
                logged_at = scope is None and norms.step == after + 1 and read is not None
                candidates.plan(entry.label, norms, scope, read if logged_at else None)
                positions.append(position)
        return candidates, positions, scope_name

    def _judge_norm(
        self, moment: Moment, tag: Tag, value: float, at_log: bool, shared: dict[Any, Any]
    ) -> None:
        hint = tag.hint
        found = shared.get(("norm", hint, at_log))
        if found is None:
            found = shared["norm", hint, at_log] = self._candidates(moment, hint, at_log)
        candidates, positions, scope_name = found
        best = judge.best_candidate(value, candidates, self.rtol)
        if best is None:  # no optimizer has stepped: nothing to judge against
            return
        optimizer, refs, verdict, matches = best
        key = tag.key
        if verdict != "unmatched":
            lagging = None
        else:
            lagging = self._unmatched(moment, tag, value, candidates, positions)
        tally = tag.tally
        if tally is None:  # its first value, or a name past the cache of names
            self._scopes.setdefault(key, scope_name)
            tally = tag.tally = self._tally(key)
        if hint is not None:  # a parameter's norm: judged at its step alone
            tally.add_judged(refs.step, optimizer, value, refs, verdict, matches)
            return
        fit = tag.fit
        if fit is None:
            fit = self._averages.get(key)
            if fit is None:
                fit = self._averages[key] = judge.AverageFit(rtol=self.rtol)
            tag.fit = fit
        position = self._position(optimizer)
        # the step it was logged at: the one just run, or the coming one after a backward
        end = refs.step
        if position is not None and position < len(moment.after):
            fresh = position < len(moment.fresh) and moment.fresh[position]
            end = moment.after[position] + (1 if fresh else 0)
        window = None
        if verdict == "unmatched" and position is not None:  # else no average
            window = self._window(position, self._last_steps.get(key), end)
        self._last_steps[key] = end
        if verdict != "unmatched" and fit.observe_matched(value):
            tally.add_judged(refs.step, optimizer, value, refs, verdict, matches)
            return
        judged = JudgedValue(refs.step, optimizer, value, refs, verdict, matches)
        for ready in fit.observe(judged, window, lagging):
            tally.add(ready)

    def _unmatched(
        self,
        moment: Moment,
        tag: Tag,
        value: float,
        candidates: Candidates,
        positions: list[int],
    ) -> JudgedValue | None:
        """An unmatched value: a post-step norm read too late to tell (its grads written
        again first) has the optimizer read them as each step ends from now on, so later
        values are told apart; where it is a whole-model norm, what it is as an earlier
        step's norm (read only now: most values fit their own step), or None."""
        for (_, refs), position in zip(candidates, positions, strict=True):
            if math.isnan(refs.post_step):
                self.watch.watched[position].read_post_at_once = True
        if tag.hint is not None:
            return None
        since = self._last_steps.get(tag.key)
        lagged = [
            (label, replace(refs, earlier=self._earlier(position, refs.step, since)))
            for (label, refs), position in zip(candidates, positions, strict=True)
        ]
        again = judge.judge_candidates(value, lagged, self.rtol)
        return again if again is not None and again.verdict != "unmatched" else None

    def _position(self, label: str) -> int | None:
        for position, entry in enumerate(self.watch.watched):
            if entry.label == label:
                return position
        return None

    def _earlier(
        self, position: int, step: int, since: int | None
    ) -> tuple[tuple[int, float], ...]:
        """The true whole-model norms of the step before ``step`` and of ``since`` (the step
        the metric was last logged at), where kept."""
        wanted = {step - 1} | ({since} if since is not None and since < step else set())
        found = [  # a skipped attempt shares the index of the step that followed it
            (n.step, n.references(None).true)
            for n in self._kept_since(position, min(wanted))
            if n.step in wanted and not n.skipped or n.skipped and n.step == step
        ]
        return tuple(sorted(found, reverse=True))

    def _kept_since(self, position: int, first: int) -> list[StepNorms]:
        """The kept steps of the watched optimizer from ``first`` on, oldest first: read from
        the newest back (a value is judged near its step: not the whole history each time)."""
        out = []
        for norms in reversed(self._history.get(position, ())):
            if norms.step < first:
                break
            out.append(norms)
        out.reverse()
        return out

    def _window(self, position: int, since: int | None, end: int) -> list[float] | None:
        """The true whole-model norms of the watched optimizer's steps after ``since`` (from
        its first step where None) up to ``end``; None where they are not all kept."""
        entry = self.watch.watched[position]
        first = 0 if since is None else since + 1
        steps = [n for n in self._kept_since(position, first) if n.step <= end and not n.skipped]
        if entry.saw_sharded or not steps or len(steps) != end - first + 1:
            return None  # a rank's shards, or steps no longer kept
        return [n.references(None).true for n in steps]

    def _rate_plans(self, moment: Moment, group: int) -> list[tuple[Any, ...]]:
        """What judging a learning rate of ``moment`` that names ``group`` needs but its
        value, per watched optimizer it may be judged at: (its label, the references of the
        step the rate claims, the step a count of steps done would name instead, the claimed
        step's rates, the last finished step, the pinned steps by index, what moved the rate
        on, the step number as read, the coming step's rates as they stood)."""
        plans = []
        for position, entry in enumerate(self.watch.watched):
            pinned = {n.step: n for n in moment.steps.get(position, ()) if not n.skipped}
            after = moment.after[position] if position < len(moment.after) else -1
            coming = moment.coming or ()
            coming = coming[position] if position < len(coming) else ()
            # a step counter that also counted the attempts the loss scaler skipped
            skips = moment.skips[position] if position < len(moment.skips) else 0
            label = moment.label
            if label is not None and skips and label not in (after, after + 1):
                label -= skips
            coming_now = coming[group] if group < len(coming) else None
            if position < len(moment.stepping) and moment.stepping[position]:
                claimed, lenient = after + 1, None
            elif label is not None and label in (after, after + 1):
                claimed = label
                lenient = after if label == after + 1 else None  # counted steps done
            else:
                # an optimizer that had not stepped yet when this was logged: its first step
                fresh = moment.fresh[position] if position < len(moment.fresh) else True
                claimed, lenient = (after + 1 if fresh else after), None
            if claimed not in pinned and lenient in pinned:  # the run ended: no next step
                claimed, lenient = lenient, None
            rates = pinned[claimed].rate(group) if claimed in pinned else None
            if rates is None:
                continue
            advanced = moment.advanced.get(group, ())
            advanced = advanced[position] if position < len(advanced) else None
            following = _rates_at(claimed + 1, pinned, after, coming_now, group)
            refs = _rate_references(
                claimed, rates, following, advanced, after, group, pinned[claimed]
            )
            plans.append(
                (entry.label, refs, lenient, rates, after, pinned, advanced, label, coming_now)
            )
        return plans

    def _judge_rate(self, moment: Moment, tag: Tag, value: float, shared: dict[Any, Any]) -> None:
        """A learning rate belongs to one step (unlike a norm, the value alone cannot tell,
        the next step's rate being a legitimate rate too): the step under way where it was
        logged during a step(); else the step the logger was told (its number read as the
        step's index, or as the count of steps done); else the step just run, or the next
        one where a backward ran since. Judged at that step of the optimizer that fits best.

        ``next-step`` needs evidence that the rate moved on after the step it is read at:
        a scheduler stepped, or the script wrote group["lr"] and logged the value under the
        step just run. A rate the script set for the coming step and logged with no step
        number, or one that nothing moved on, equal to the coming step's rate, is judged as
        the coming step's (nanoGPT sets the rate at the top of an iteration and logs it).
        """
        group = tag.group
        plans = shared.get(("rate", group))
        if plans is None:
            plans = shared[("rate", group)] = self._rate_plans(moment, group)
        best: JudgedValue | None = None
        rtol = self.rtol
        for optimizer, refs, lenient, rates, after, pinned, advanced, label, coming in plans:
            verdict, matches = judge.judge_rate(value, refs, rtol)
            if verdict == "correct" and (best is None or best.rank > 0):
                # the rate applied, the first right reading: none beats it
                tally = self._rate_tally(tag)
                tally.add_judged(refs.step, optimizer, value, refs, verdict, matches)
                return
            judged = JudgedValue(refs.step, optimizer, value, refs, verdict, matches)
            if judged.verdict == "next-step" and not (
                advanced == "scheduler" or (advanced == "write" and label is not None)
            ):
                # nothing says the rate moved on after the step it is read at: the value is
                # the coming step's, as the script set it
                following = _rates_at(after + 1, pinned, after, coming, group)
                if following is not None:
                    coming_refs = _rate_references(
                        after + 1, following, None, None, after, group, pinned.get(after + 1)
                    )
                    judged = judge.judge_claimed(value, optimizer, coming_refs, rtol)
            if judged.verdict != "correct" and lenient is not None and lenient in pinned:
                # a step number that counts the steps done names the step before
                earlier = pinned[lenient].rate(group)
                if earlier is not None:
                    previous = _rate_references(
                        lenient, earlier, rates, None, after, group, pinned[lenient]
                    )
                    other = judge.judge_claimed(value, optimizer, previous, rtol)
                    if other.rank < judged.rank:
                        judged = other
            if best is None or judged.rank < best.rank:
                best = judged
        if best is None or best.verdict != "correct":
            best = self._skipped_rate(moment, value, group) or best
        if best is not None:
            self._rate_tally(tag).add(best)

    def _rate_tally(self, tag: Tag) -> MetricTally:
        tally = tag.tally
        if tally is None:  # its first value, or a name past the cache of names
            self._quantities[tag.key] = "learning_rate"
            tally = tag.tally = self._tally(tag.key)
        return tally

    def _skipped_rate(self, moment: Moment, value: float, group: int) -> JudgedValue | None:
        """A rate logged for an attempt the loss scaler skipped, judged against the rates
        that attempt was given: ``skipped-step`` where it is its own (that step never ran),
        ``other-group`` where it is another group's; None where neither."""
        for position, entry in enumerate(self.watch.watched):
            for norms in moment.steps.get(position, ()):
                rates = norms.rate(group) if norms.skipped else None
                if rates is None:
                    continue
                refs = _rate_references(norms.step, rates, None, None, -1, group, norms)
                judged = judge.judge_claimed(value, entry.label, refs, self.rtol)
                if judged.verdict == "correct":
                    return replace(judged, verdict="skipped-step")
                if judged.verdict == "other-group":
                    return judged
        return None

    def _scope(
        self, entry: Watched, hint: str | None, module: Callable[[], Any] | None
    ) -> tuple[int, ...] | None:
        """The parameter indices a name ending in ``hint`` measures; None: the whole model."""
        if hint is None:
            return None
        found = entry.names.aliases.get(hint)
        if found:
            return found
        owner = module() if module is not None else None
        if owner is None:
            return None
        key = (id(owner), id(entry))
        aliases = self._module_aliases.get(key)
        if aliases is None:
            index = {id(p): i for i, p in enumerate(entry.params)}
            collected: dict[str, set[int]] = {}
            for name, p in owner.named_parameters():
                if id(p) in index:
                    parts = name.split(".")
                    for end in range(1, len(parts) + 1):
                        collected.setdefault(".".join(parts[:end]), set()).add(index[id(p)])
            aliases = {k: tuple(sorted(v)) for k, v in collected.items()}
            self._module_aliases[key] = aliases
        return aliases.get(hint)
