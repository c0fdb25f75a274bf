"""The step auditor: fingerprints grads in an optimizer's step pre/post hooks.

One ``StepAuditor`` serves the probe (``attach`` to one optimizer), ``sfdiag run``
(torch's global optimizer hooks call ``pre_step``/``post_step``) and the testing
helpers. It records, per step, the global pre/post grad norms and each
parameter's verdict and fingerprint.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

from sfdiag.step_audit import snapshot, verdict
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


@dataclass
class StepObservation:
    pre_norm: float  # over this process's grads (a DTensor's local shard)
    post_norm: float
    params: list[ParamStep]
    digests: tuple[int, ...] = ()  # per parameter, of the grad step() was given (0: none)
    # the grads step() was given held NaN and no finite non-zero element: comparing bits
    # (NaN equals NaN) cannot tell an in-place change from none
    nan_only: bool = False

    @property
    def params_mutated(self) -> int:
        return sum(p.verdict != "clean" for p in self.params)


def _weak(obj: Any) -> Any:
    """A weak reference to ``obj``, or None where it takes none."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _global_norm(prints: list[snapshot.GradFingerprint]) -> float:
    return math.sqrt(math.fsum(fp.norm * fp.norm for fp in prints if fp.present))


def _rows(tensors: list[torch.Tensor]) -> Any:
    """``tensors`` (of one length) as the rows of one float64 numpy array: one stack, one
    conversion."""
    rows = torch.stack(tensors)  # samples are flat already: no view a tensor
    return rows.reshape(len(tensors), -1).to("cpu", torch.float64).numpy()


#: the grads a step changed are compared in arrays of this many rows at most (a float64
#: array and the fits' scratch per row: bounded memory in a step hook, whatever the model)...
BATCH_ROWS = 128
#: ... where there are this many of one sample length; fewer, one at a time (a model of a
#: few large tensors keeps the memory of one grad's fits, under 1 % of its parameters)
BATCH_MIN = 16


def _chunks(groups: Any) -> list[list[int]]:
    """``groups`` (lists of grad indices) cut into the rows of one array each (see
    ``BATCH_ROWS``, ``BATCH_MIN``)."""
    out = []
    for indices in groups:
        size = BATCH_ROWS if len(indices) >= BATCH_MIN else 1
        out += [indices[start : start + size] for start in range(0, len(indices), size)]
    return out


def _state_rows(tensors: list[torch.Tensor]) -> Any:
    """``_rows`` of the samples of ``tensors`` (one state, of one shape): the elements
    ``snapshot.sample_positions`` names. Tensors no larger than a sample are stacked whole
    (no view a tensor); larger ones by their samples' views, so that nothing more than the
    samples is ever copied. None where every sample has a negative element: no second
    moment, the fits' one use of state (not worth a float64 copy)."""
    small = tensors[0].numel() <= snapshot.SAMPLE_SIZE
    rows = torch.stack(tensors if small else [snapshot.sample_view(t) for t in tensors])
    rows = rows.reshape(len(tensors), -1)
    if bool((rows < 0).any(dim=1).all()):
        return None
    return rows.to("cpu", torch.float64).numpy()


def _numpy(t: torch.Tensor | None):
    if t is None:
        return None
    return t.detach().to("cpu", torch.float64).numpy()


def _dtype_eps(t: torch.Tensor) -> float:
    return float(torch.finfo(t.dtype).eps) if t.is_floating_point() else 0.0


#: the Adam fit's eps where an optimizer has none that reads as one number
DEFAULT_EPS = 1e-8


def _as_eps(value: Any) -> float:
    """An optimizer's ``eps`` as one float: the first of a tuple (Adafactor's
    ``(1e-30, 1e-3)``), DEFAULT_EPS for what is no number (None, ``(None, 1e-3)``, "auto")."""
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    try:
        eps = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of many elements
        return DEFAULT_EPS
    return eps if math.isfinite(eps) and eps >= 0 else DEFAULT_EPS


def _group_eps(optimizer: Any, param: torch.Tensor) -> float:
    """The eps of ``param``'s group; the fit needs only its order of magnitude, so odd
    hyperparameters (and odd groups) fall back to DEFAULT_EPS instead of failing the audit."""
    return _eps_by_param(optimizer).get(id(param), DEFAULT_EPS)


def _eps_by_param(optimizer: Any) -> dict[int, float]:
    """``_group_eps`` of every parameter, by id, in one pass over the groups."""
    out: dict[int, float] = {}
    for group in getattr(optimizer, "param_groups", ()):
        if isinstance(group, Mapping):
            eps = _as_eps(group.get("eps", DEFAULT_EPS))
            for p in group.get("params", ()):
                out.setdefault(id(p), eps)
    return out


def _nan_only(params: list[torch.Tensor], prints: list[snapshot.GradFingerprint]) -> bool:
    """Whether the grads hold NaN (or Inf) and no finite non-zero element (the zeros a ReLU
    leaves in a NaN grad are no number either): no change that keeps NaN a NaN shows in
    their bits. Only grads whose norm is not finite are read again: a healthy step pays
    nothing."""
    present = [(p, fp) for p, fp in zip(params, prints, strict=True) if fp.present]
    if all(math.isfinite(fp.norm) for _, fp in present):
        return False
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
    _pending: dict[int, tuple[list[torch.Tensor], list[snapshot.GradFingerprint], bool]] = field(
        default_factory=dict
    )
    _handles: list[Any] = field(default_factory=list)
    # id(optimizer) -> the ids of the params whose grads its last audited step mutated: the
    # params sampled before step(), to name the kind of a mutation (a clean step of a large
    # model does not pay for reading cold parameters); its first audited step samples all
    # (an optimizer gone and a new one at its address must not inherit this: its weak
    # reference, where it takes one, says whose it is)
    _mutated: dict[int, tuple[Any, set[int]]] = field(default_factory=dict)

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
            params, full=self.forensics, param_samples=self._params_to_sample(optimizer, params)
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
        if last is None or (owner is not None and owner() is not optimizer):
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
        # On an accelerator the optimizer's state is sampled with the grads, so the snapshot
        # stays one transfer; on the CPU (no transfer) it is sampled where a grad mutated.
        on_device = any(p.device.type != "cpu" for p in params)
        sampler = None
        if on_device and self.fingerprint_kinds and not self.forensics:

            def sampler(param: torch.Tensor) -> dict[str, torch.Tensor]:
                return snapshot.state_views(optimizer, param)

        after = snapshot.take(
            params, full=self.forensics, param_samples=False, before=before, states=sampler
        )
        if self.forensics:  # whole clones: one grad at a time
            compared = [
                (p, self._compare(optimizer, i, p, a, b))
                for i, (p, a, b) in enumerate(zip(params, before, after, strict=True))
                if a.present
            ]
        else:
            compared = self._compare_all(optimizer, params, before, after)
        records = [record for _, record in compared]
        self._mutated[id(optimizer)] = (
            _weak(optimizer),
            {id(p) for p, r in compared if r.verdict == "mutated"},
        )
        self.observations.append(
            StepObservation(
                _global_norm(before),
                _global_norm(after),
                records,
                tuple(snapshot.digest(fp) for fp in before),
                nan_only,
            )
        )

    def _compare_all(
        self,
        optimizer: Any,
        params: list[torch.Tensor],
        before: list[snapshot.GradFingerprint],
        after: list[snapshot.GradFingerprint],
    ) -> list[tuple[torch.Tensor, ParamStep]]:
        """``_compare`` of every parameter whose grad was present before ``step()``, the
        grads that changed read together: their samples as the rows of one array per
        sample length, their change and the kind of their mutation computed over all rows
        at once (``verdict.max_rel_change_rows``, ``verdict.fingerprint_rows``). A clean
        step pays a few µs a parameter; a mutating one a few more, not a fit each."""
        steps: dict[int, ParamStep] = {}
        changed: dict[int, str] = {}  # index -> kind, for the grads that did not stay
        for i, (p, a, b) in enumerate(zip(params, before, after, strict=True)):
            if not a.present:
                continue
            if b is a:  # take() kept the fingerprint from before: nothing moved
                kind = "clean"
            else:
                same_object = b.present and a.ref() is not None and a.ref() is b.ref()
                kind = verdict.classify(b.present, same_object, same_object and a.same_content(b))
            if kind == "clean":
                steps[i] = self._step(i, p, a, b, "clean", 0.0, None)
            else:
                changed[i] = kind
        changes, kinds = _ChangedGrads(
            optimizer, params, before, after, changed, self.fingerprint_kinds
        ).compare()
        for i, kind in changed.items():
            steps[i] = self._step(i, params[i], before[i], after[i], kind, changes[i], kinds.get(i))
        return [(params[i], steps[i]) for i in sorted(steps)]

    def _step(
        self,
        index: int,
        param: torch.Tensor,
        a: snapshot.GradFingerprint,
        b: snapshot.GradFingerprint,
        kind: str,
        change: float | None,
        fp: str | None,
    ) -> ParamStep:
        return ParamStep(
            name=self.names.get(id(param), f"param{index}"),
            shape=tuple(param.shape),
            verdict=kind,
            pre_norm=a.norm,
            post_norm=b.norm if b.present else 0.0,
            max_rel_change=change,
            fingerprint=fp,
        )

    def _compare(
        self,
        optimizer: Any,
        index: int,
        param: torch.Tensor,
        a: snapshot.GradFingerprint,
        b: snapshot.GradFingerprint,
    ) -> ParamStep:
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
        return self._step(index, param, a, b, kind, change, fp)


@dataclass
class _ChangedGrads:
    """The grads one step changed (``changed``: index -> verdict), compared as the rows of
    arrays (see ``StepAuditor._compare_all``)."""

    optimizer: Any
    params: list[torch.Tensor]
    before: list[snapshot.GradFingerprint]
    after: list[snapshot.GradFingerprint]
    changed: dict[int, str]
    fingerprint_kinds: bool
    eps: dict[int, float] = field(default_factory=dict)

    def compare(self) -> tuple[dict[int, float | None], dict[int, str]]:
        """The max relative change of each changed grad's sample (None where there is none
        after, or of another length), and the kind of each mutated grad's change."""
        changes: dict[int, float | None] = dict.fromkeys(self.changed)
        by_length: dict[int, list[int]] = {}
        for i in self.changed:
            a, b = self.before[i], self.after[i]
            if b.present and a.sample is not None and b.sample is not None:
                if a.sample.shape == b.sample.shape:
                    by_length.setdefault(a.sample.numel(), []).append(i)
        kinds: dict[int, str] = {}
        if self.fingerprint_kinds and "mutated" in self.changed.values():
            self.eps = _eps_by_param(self.optimizer)
        for chunk in _chunks(by_length.values()):
            self._compare_rows(chunk, changes, kinds)
        return changes, kinds

    def _compare_rows(
        self, indices: list[int], changes: dict[int, float | None], kinds: dict[int, str]
    ) -> None:
        """``compare`` of the grads ``indices`` (samples of one length), as rows of one array."""
        pre = _rows([self.before[i].sample for i in indices])
        post = _rows([self.after[i].sample for i in indices])
        if len(indices) == 1:  # in place, in two scratch arrays
            changes[indices[0]] = verdict.max_rel_change(pre[0], post[0])
        else:
            changes.update(zip(indices, verdict.max_rel_change_rows(pre, post), strict=True))
        mutated = [k for k, i in enumerate(indices) if self.changed[i] == "mutated"]
        if mutated and self.fingerprint_kinds:
            kinds.update(self._kinds(indices, mutated, pre, post))

    def _kinds(self, indices: list[int], mutated: list[int], pre: Any, post: Any) -> dict[int, str]:
        """The kind of each mutated grad's change (rows ``mutated`` of ``pre``/``post``),
        fitted over the rows that share a param sample or none, and the optimizer's state
        names and shapes: one ``verdict.fingerprint_rows`` call each (one grad alone: its
        own fits)."""
        import numpy as np

        groups: dict[tuple[Any, ...], list[tuple[int, dict[str, Any]]]] = {}
        for k in mutated:
            i = indices[k]
            a, b = self.before[i], self.after[i]
            # on an accelerator the snapshot sampled the state; on the CPU the state tensors
            # themselves, sampled in one stack per name and shape (``_state_rows``)
            sampled = b.states
            if sampled is None:
                sampled = snapshot.state_tensors(self.optimizer, self.params[i])
            shapes = tuple((name, t.shape) for name, t in sampled.items())
            groups.setdefault((a.param_sample is not None, shapes), []).append((k, sampled))
        out: dict[int, str] = {}
        for (has_y, shapes), rows in groups.items():
            ks = [k for k, _ in rows]
            chosen = [indices[k] for k in ks]
            y = _rows([self.before[i].param_sample for i in chosen]) if has_y else None
            states = {name: _state_rows([s[name] for _, s in rows]) for name, _ in shapes}
            states = {name: state for name, state in states.items() if state is not None}
            eps_of = np.array([self.eps.get(id(self.params[i]), DEFAULT_EPS) for i in chosen])
            dtype_eps = np.array([_dtype_eps(self.before[i].sample) for i in chosen])
            if len(ks) == 1:  # one grad: its own fits, in their scratch arrays
                found = [
                    verdict.fingerprint(
                        pre[ks[0]],
                        post[ks[0]],
                        None if y is None else y[0],
                        {name: state[0] for name, state in states.items()},
                        float(eps_of[0]),
                        dtype_eps=float(dtype_eps[0]),
                        states_are_scratch=True,
                    )
                ]
            else:
                found = verdict.fingerprint_rows(pre[ks], post[ks], y, states, eps_of, dtype_eps)
            out.update(zip(chosen, found, strict=True))
        return out


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
