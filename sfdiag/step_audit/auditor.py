"""The step auditor: fingerprints grads in an optimizer's step pre/post hooks.

One ``StepAuditor`` serves the probe (``attach`` to one optimizer), ``sfdiag run``
(torch's global optimizer hooks call ``pre_step``/``post_step``) and the testing
helpers. It records, per step, the global pre/post grad norms and each
parameter's verdict and fingerprint.
"""

from __future__ import annotations

import math
import operator
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from types import FrameType
from typing import Any

import torch

from sfdiag.step_audit import snapshot, verdict
from sfdiag.step_audit.changes import (  # noqa: F401 (_group_eps, DEFAULT_EPS: tests)
    DEFAULT_EPS,
    ChangedGrads,
    _dtype_eps,
    _group_eps,
    _numpy,
    shared_groups,
)
from sfdiag.step_audit.rows import GONE
from sfdiag.step_audit.verdict import ParamStep

# the code object of the wrapper torch puts around every Optimizer subclass's step()
_STEP_WRAPPER_CODE = getattr(
    torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None), "__code__", None
)


def active_steps(optimizer: Any) -> int:
    """How many hooked ``step()`` calls of ``optimizer`` are on the stack right now.

    2 or more inside a hook means a nested call (a subclass's ``step()`` calling
    ``super().step()`` fires the hooks again when both classes are hooked): only the
    outermost is the real step. Unlike a depth counter this stays right after a
    ``step()`` that raised. Returns 1 when the wrapper cannot be recognised.
    """
    if _STEP_WRAPPER_CODE is None:
        return 1
    count = 0
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _STEP_WRAPPER_CODE and frame.f_locals.get("self") is optimizer:
            count += 1
        frame = frame.f_back
    return max(count, 1)


def class_path(obj: Any) -> str:
    """``"module:QualName"`` of ``obj``'s class, by its shortest public module.

    ``torch.optim.adamw.AdamW`` is ``torch.optim:AdamW``, as the registry names it, when
    the package re-exports the class; otherwise the defining module.
    """
    cls = type(obj)
    parts = cls.__module__.split(".")
    for end in range(1, len(parts)):
        prefix = ".".join(parts[:end])
        if any(p.startswith("_") for p in parts[:end]):
            break
        module = sys.modules.get(prefix)
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{prefix}:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"


#: what the comparison found of one grad: its verdict, the max relative change of its
#: sample and the kind of its mutation (None where there is none)
Found = tuple[str, float | None, str | None]
_CLEAN: Found = ("clean", 0.0, None)
_SHAPE = operator.attrgetter("shape")
#: distinct shapes kept (``StepAuditor._shapes``)
_SHAPES_KEPT = 4096


@dataclass
class StepObservation:
    pre_norm: float  # over this process's grads (a DTensor's local shard)
    post_norm: float
    params: Sequence[ParamStep]  # per parameter with a grad before step() (``ParamSteps``)
    digests: tuple[int, ...] = ()  # per parameter, of the grad step() was given (0: none)
    # the grads step() was given held NaN and no finite non-zero element: comparing bits
    # (NaN equals NaN) cannot tell an in-place change from none
    nan_only: bool = False

    @property
    def params_mutated(self) -> int:
        changed = getattr(self.params, "changed", None)
        if changed is not None:
            return changed
        return sum(p.verdict != "clean" for p in self.params)


class ParamSteps(Sequence):
    """One step's ``ParamStep`` per parameter with a grad before ``step()``, in order, built
    when first read (on a model of thousands of tensors, building them every step cost as
    much as reading the grads): from each grad's name, shape and norms, and its verdict,
    change and kind where the comparison found it other than bit for bit as it was."""

    def __init__(
        self,
        names: Sequence[str],
        shapes: list[Any],
        pre: list[float | None],
        post: list[float | None],
        found: dict[int, Found],
    ) -> None:
        self._parts: Any = (names, shapes, pre, post, found)
        self._steps: list[ParamStep] | None = None
        self.changed = len(found) - list(map(operator.itemgetter(0), found.values())).count("clean")

    def _all(self) -> list[ParamStep]:
        if self._steps is None:
            names, shapes, pre, post, found = self._parts
            steps = []
            for i, norm in enumerate(pre):
                if norm is None:  # no grad before step(): no record
                    continue
                kind, change, kind_of_change = found.get(i, _CLEAN)
                after = 0.0 if post[i] is None else post[i]
                steps.append(
                    ParamStep(names[i], tuple(shapes[i]), kind, norm, after, change, kind_of_change)
                )
            self._steps, self._parts = steps, None
        return self._steps

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, index: Any) -> Any:
        return self._all()[index]

    def __iter__(self) -> Iterator[ParamStep]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    def __repr__(self) -> str:
        return repr(self._all())


def _weak(obj: Any) -> Any:
    """A weak reference to ``obj``, or None where it takes none."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _group_verdicts(
    before: snapshot.Snapshot, after: snapshot.Snapshot, found: dict[int, Found]
) -> tuple[dict[int, str], dict[int, bool]]:
    """The verdicts of the grads of the groups read before and after ``step()`` alike, from
    the groups' arrays at once: where every grad of a group is the same tensor, each is
    clean or mutated as its row reads bit for bit the same or not (clean ones into
    ``found``), the mutated returned; the rows of the other groups, whether each reads the
    same, for ``_compare_all`` to judge grad by grad. (The grads ``after.kept`` are left
    out: clean.)"""
    changed: dict[int, str] = {}
    same_rows: dict[int, bool] = {}
    kept = after.kept
    for key, now in shared_groups(before, after):
        then = before.groups[key]
        same = now.same_rows(then)
        if same is None:
            continue
        if not all(map(operator.is_, then.grads, now.grads)):
            same_rows.update(zip(key, same.tolist(), strict=True))
            continue
        if not kept and not same.any():  # a mutating step, as a rule: all of them
            changed.update(dict.fromkeys(key, "mutated"))
            continue
        for i, alike in zip(key, same.tolist(), strict=True):
            if i in kept:
                continue
            if alike:
                found[i] = _CLEAN
            else:
                changed[i] = "mutated"
    return changed, same_rows


def _in_process_group() -> bool:
    """Whether this process is one rank of a job (``torch.distributed`` initialised): only
    then are the grads' digests read, for the ranks to compare."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _norm_over(norms: list[float | None]) -> float:
    """The L2 norm over the grads' norms (their global norm), exactly rounded."""
    if None in norms:  # (a param without a grad)
        norms = [n for n in norms if n is not None]
    return math.sqrt(math.fsum(map(operator.mul, norms, norms)))


def _nan_only(params: list[torch.Tensor], prints: snapshot.Snapshot) -> bool:
    """Whether the grads hold NaN (or Inf) and no finite non-zero element (the zeros a ReLU
    leaves in a NaN grad are no number either): no change that keeps NaN a NaN shows in
    their bits. Only grads whose norm is not finite are read again: a healthy step pays
    nothing."""
    if prints.all_finite():
        return False
    present = [(p, fp) for p, fp in zip(params, prints, strict=True) if fp.present]
    return all(
        fp.norm == 0 or (not math.isfinite(fp.norm) and not snapshot.holds_a_number(p.grad))
        for p, fp in present
    )


@dataclass
class StepAuditor:
    """Collects a StepObservation for every ``step()`` of the optimizers it watches."""

    names: dict[int, str] = field(default_factory=dict)  # id(param) -> name
    forensics: bool = False
    fingerprint_kinds: bool = True  # name the kind of a mutation (reads optimizer state)
    observations: list[StepObservation] = field(default_factory=list)
    _pending: dict[int, tuple[list[torch.Tensor], snapshot.Snapshot, bool]] = field(
        default_factory=dict
    )
    _handles: list[Any] = field(default_factory=list)
    _names_of: tuple[tuple[int, ...], tuple[str, ...]] | None = None  # (``_names``)
    # one torch.Size a distinct shape, shared by every step's records: a Size is an object
    # the collector tracks, and a step of a thousand tensors would keep a thousand more
    _shapes: dict[Any, Any] = field(default_factory=dict)
    # id(optimizer) -> the ids of the params whose grads its last audited step mutated (True:
    # every one): the params sampled before step(), to name the kind of a mutation (a clean
    # step of a large model does not pay for reading cold parameters); its first audited
    # step samples all (an optimizer gone and a new one at its address must not inherit
    # this: its weak reference, where it takes one, says whose it is)
    _mutated: dict[int, tuple[Any, set[int] | bool]] = field(default_factory=dict)

    @staticmethod
    def params_of(optimizer: Any) -> list[torch.Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def attach(self, optimizer: Any) -> StepAuditor:
        """Watch ``optimizer`` through its own step hooks."""
        self._handles.append(optimizer.register_step_pre_hook(self.pre_step))
        self._handles.append(optimizer.register_step_post_hook(self.post_step))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def pre_step(self, optimizer: Any, *_: Any) -> None:
        """Snapshot A: the grads as handed to ``step()``."""
        if active_steps(optimizer) == 1:
            self._snapshot_before(optimizer)

    def _snapshot_before(self, optimizer: Any) -> None:
        params = self.params_of(optimizer)
        prints = snapshot.take(
            params,
            full=self.forensics,
            param_samples=self._params_to_sample(optimizer, params),
            digests=_in_process_group(),
        )
        self._pending[id(optimizer)] = (params, prints, _nan_only(params, prints))

    def _params_to_sample(self, optimizer: Any, params: list[torch.Tensor]) -> bool | set[int]:
        """Which params the snapshot before ``step()`` samples: those whose grads the last
        audited step mutated (an optimizer that starts mutating mid-run has the kind of its
        first mutated step named without them); all at the first, and with forensics."""
        if self.forensics:
            return True
        if not self.fingerprint_kinds:
            return False
        owner, last = self._mutated.get(id(optimizer), (None, None))
        if last is None or last is True or (owner is not None and owner() is not optimizer):
            return True
        return {i for i, p in enumerate(params) if id(p) in last}

    def retake(self, optimizer: Any) -> None:
        """Snapshot A again: a closure recomputed the grads inside ``step()``."""
        if id(optimizer) in self._pending:
            self._snapshot_before(optimizer)

    def post_step(self, optimizer: Any, *_: Any) -> None:
        """Snapshot B, compared with A."""
        if active_steps(optimizer) > 1:
            return
        pending = self._pending.pop(id(optimizer), None)
        if pending is None:
            return
        params, before, nan_only = pending
        sampler = None
        if self._state_with_grads(params) and self.fingerprint_kinds and not self.forensics:

            def sampler(param: torch.Tensor) -> dict[str, torch.Tensor]:
                return snapshot.state_views(optimizer, param)

        after = snapshot.take(
            params,
            full=self.forensics,
            param_samples=False,
            before=before,
            states=sampler,
            states_of_group=None if sampler is None else partial(snapshot.state_rows, optimizer),
        )
        pre, post = before.norms(), after.norms()
        if self.forensics:  # whole clones: one grad at a time
            found = {
                i: self._compare(optimizer, p, before[i], after[i])
                for i, (p, norm) in enumerate(zip(params, pre, strict=True))
                if norm is not None
            }
        else:
            found = self._compare_all(optimizer, params, before, after)
        records = ParamSteps(self._names(params), self._shapes_of(params), pre, post, found)
        mutated = [i for i, (kind, _, _) in found.items() if kind == "mutated"]
        self._mutated[id(optimizer)] = (
            _weak(optimizer),
            True if len(mutated) == len(params) else {id(params[i]) for i in mutated},
        )
        self.observations.append(
            StepObservation(_norm_over(pre), _norm_over(post), records, before.digests(), nan_only)
        )

    def _shapes_of(self, params: list[torch.Tensor]) -> list[Any]:
        """Each param's shape, as the one Size kept for it (``_shapes``)."""
        if len(self._shapes) > _SHAPES_KEPT:  # ever-new shapes: start again
            self._shapes.clear()
        shared = self._shapes.setdefault
        # one at a time (``map``): each new Size is gone before the next is made
        return [shared(shape, shape) for shape in map(_SHAPE, params)]

    @staticmethod
    def _state_with_grads(params: list[torch.Tensor]) -> bool:
        """Whether the snapshot after ``step()`` samples the optimizer's state with the
        grads: on an accelerator, so that it stays one transfer; on the CPU (no transfer)
        the comparison reads it where a grad mutated."""
        return not all([p.is_cpu for p in params])  # (no device object a param)

    def _names(self, params: list[torch.Tensor]) -> tuple[str, ...]:
        """Each param's name (``param<i>`` where ``names`` has none), kept while the params
        are the same objects in the same order."""
        ids = tuple(map(id, params))
        if self._names_of is None or self._names_of[0] != ids:
            names = tuple(self.names.get(k, f"param{i}") for i, k in enumerate(ids))
            self._names_of = (ids, names)
        return self._names_of[1]

    def _compare_all(
        self,
        optimizer: Any,
        params: list[torch.Tensor],
        before: snapshot.Snapshot,
        after: snapshot.Snapshot,
    ) -> dict[int, Found]:
        """The records of the grads present before ``step()`` that ``take`` did not find
        bit for bit as they were (``after.kept``: clean, left to ``ParamSteps``), the grads
        that changed read together: their samples as the rows of one array per sample
        length, their change and the kind of their mutation computed over all rows at once
        (``verdict.max_rel_change_rows``, ``verdict.fingerprint_rows``). A clean step pays
        no Python a grad here; a mutating one a few µs a grad, not a fit each."""
        found: dict[int, Found] = {}
        held, _, _ = before.identities()
        kept = after.kept
        # (counted by identity: ``list.count`` would ask each tensor whether it == None)
        present = len(held) - sum(map(operator.is_, held, repeat(None)))
        if len(kept) == present:  # every grad as it was: a clean step
            return found
        changed, same_rows = _group_verdicts(before, after, found)
        judged = changed.keys() | found.keys()
        rest = [
            i
            for i in (sorted(set(range(len(held))) - judged) if judged else range(len(held)))
            if held[i] is not None and i not in kept
        ]
        held_after = after.identities()[0] if rest else None
        for i in rest:
            then = held[i]
            now = held_after[i]
            same_object = now is not None and now is not GONE and then is now
            if not same_object:
                same = False
            elif i in same_rows:
                same = same_rows[i]
            else:
                same = before.same_content(i, after)
            kind = verdict.classify(now is not None, same_object, same)
            if kind == "clean":
                found[i] = _CLEAN
            else:
                changed[i] = kind
        changes, kinds = ChangedGrads(
            optimizer, params, before, after, changed, self.fingerprint_kinds
        ).compare()
        kinds_of = map(kinds.get, changed)
        records = zip(changed.values(), map(changes.__getitem__, changed), kinds_of, strict=True)
        found.update(zip(changed, records, strict=True))
        return found

    def _compare(
        self,
        optimizer: Any,
        param: torch.Tensor,
        a: snapshot.GradFingerprint,
        b: snapshot.GradFingerprint,
    ) -> Found:
        """What one grad's fingerprints before and after ``step()`` say (forensics: whole
        clones compared, one grad at a time)."""
        if b is a:  # take() kept the fingerprint from before: nothing moved
            kind = "clean"
        else:
            same_object = b.present and a.ref() is not None and a.ref() is b.ref()
            kind = verdict.classify(b.present, same_object, same_object and a.same_content(b))
        change = None
        fp = None
        if kind == "clean":  # bit-identical samples: no element moved, nothing to convert
            pre = post = None
            change = 0.0
        else:
            pre = _numpy(a.full if a.full is not None else a.sample)
            post_t = b.full if b.full is not None else b.sample
            post = _numpy(post_t) if b.present else None
        if post is not None and pre is not None and post.shape == pre.shape:
            change = verdict.max_rel_change(pre, post)
            if kind == "mutated" and self.fingerprint_kinds:
                y = a.full_param if a.full_param is not None else a.param_sample
                sampled = b.states
                if sampled is None:
                    sampled = snapshot.state_samples(optimizer, param, full=self.forensics)
                # only a state with no negative element can be a second moment (the fits'
                # one use of state): the others are not worth a float64 copy
                states = {k: _numpy(v) for k, v in sampled.items() if not bool((v < 0).any())}
                fp = verdict.fingerprint(
                    pre,
                    post,
                    _numpy(y),
                    states,
                    _group_eps(optimizer, param),
                    dtype_eps=_dtype_eps(a.sample if a.sample is not None else param),
                    states_are_scratch=True,
                )
        return kind, change, fp


def exception_text(exc: BaseException) -> str:
    """``TypeName: the message's first line``: how an error row quotes an exception."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class AuditError(Exception):
    """sfdiag's own failure while auditing a step, neither the optimizer's nor the model's.

    Its message starts with ``verdict.SFDIAG_FAILED``.
    """


def _guarded(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, with any failure of sfdiag's own code in it raised as an AuditError: a hook
    runs inside the optimizer's step(), where a plain error would pass for the optimizer's."""

    def guarded(*args: Any) -> Any:
        try:
            return hook(*args)
        except AuditError:
            raise
        except Exception as exc:
            raise AuditError(f"{verdict.SFDIAG_FAILED}: {exception_text(exc)}") from exc

    return guarded


@dataclass(frozen=True)
class _Unhooked:
    """What the auditor reads of an optimizer it cannot hook: the model's params."""

    optimizer: Any
    params: list[torch.Tensor]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.params}]

    @property
    def state(self) -> Any:
        return getattr(self.optimizer, "state", {})


def _hook_into(optimizer: Any, pre: Callable[..., Any], post: Callable[..., Any]) -> list[Any]:
    """Handles of ``pre`` and ``post`` registered as ``optimizer``'s step hooks; none where it
    has no step hooks that fire: not a torch optimizer, or an Optimizer subclass that never
    called ``Optimizer.__init__`` (timm's Lookahead), which has no hook dicts and whose
    step() torch never wrapped."""
    if not getattr(getattr(type(optimizer), "step", None), "hooked", False):
        return []
    handles: list[Any] = []
    try:
        handles.append(optimizer.register_step_pre_hook(pre))
        handles.append(optimizer.register_step_post_hook(post))
    except Exception:  # no hook dicts after all: snapshots around step() serve
        for handle in handles:
            handle.remove()
        return []
    return handles


@dataclass
class StepWatch:
    """One optimizer, followed by a StepAuditor over one model's parameters.

    Through the optimizer's own step hooks where they work; otherwise (any object with
    ``step()``, an Optimizer subclass that skipped ``Optimizer.__init__``) by snapshots of
    ``params`` taken around the call. Call ``before_step()`` and ``after_step()`` around
    every ``step()`` either way. The auditor's own failures surface as AuditError.
    """

    auditor: StepAuditor
    optimizer: Any
    params: list[torch.Tensor]
    target: Any = None  # what the auditor reads: the optimizer, or an _Unhooked view
    _handles: list[Any] = field(default_factory=list)
    _seen: int = 0

    @classmethod
    def start(cls, auditor: StepAuditor, optimizer: Any, params: list[torch.Tensor]) -> StepWatch:
        handles = _hook_into(optimizer, _guarded(auditor.pre_step), _guarded(auditor.post_step))
        target = optimizer if handles else _Unhooked(optimizer, params)
        return cls(auditor, optimizer, params, target, handles)

    @property
    def hooked(self) -> bool:
        return bool(self._handles)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the grads for the next step: by the optimizer's ``zero_grad()`` where it has a
        usable one, else directly (only ``step()`` is required of an optimizer)."""
        own = getattr(self.optimizer, "zero_grad", None)
        # torch's zero_grad on an Optimizer never initialised wraps its class's step() in
        # the hook-firing wrapper, which then fails for want of hook dicts
        uninitialised = (
            not self.hooked
            and isinstance(self.optimizer, torch.optim.Optimizer)
            and getattr(type(self.optimizer), "zero_grad", None) is torch.optim.Optimizer.zero_grad
        )
        if callable(own) and not uninitialised:
            own(set_to_none=set_to_none)
            return
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:  # as torch's zero_grad: the same tensor, zeroed, out of any graph
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def before_step(self) -> None:
        self._seen = len(self.auditor.observations)
        if not self.hooked:
            _guarded(self.auditor.pre_step)(self.target)

    def retake(self) -> None:
        """A closure recomputed the grads inside ``step()``: snapshot A again."""
        _guarded(self.auditor.retake)(self.target)

    def after_step(self) -> StepObservation:
        """The observation of the ``step()`` that just ran."""
        if not self.hooked:
            _guarded(self.auditor.post_step)(self.target)
        if len(self.auditor.observations) == self._seen:
            raise AuditError(
                f"{verdict.SFDIAG_FAILED}: step() ran without firing the optimizer's step hooks"
            )
        return self.auditor.observations[-1]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
