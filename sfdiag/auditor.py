"""The step auditor: fingerprints grads in an optimizer's step pre/post hooks.

One ``StepAuditor`` serves the probe (``attach`` to one optimizer), ``sfdiag run``
(torch's global optimizer hooks call ``pre_step``/``post_step``) and the testing
helpers. It records, per step, the global pre/post grad norms and each
parameter's verdict and fingerprint.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

from sfdiag import snapshot, verdict
from sfdiag.verdict import ParamStep

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

    @property
    def params_mutated(self) -> int:
        return sum(p.verdict != "clean" for p in self.params)


def _global_norm(prints: list[snapshot.GradFingerprint]) -> float:
    return math.sqrt(math.fsum(fp.norm * fp.norm for fp in prints if fp.present))


def _numpy(t: torch.Tensor | None):
    if t is None:
        return None
    return t.detach().to("cpu", torch.float64).numpy()


def _dtype_eps(t: torch.Tensor) -> float:
    return float(torch.finfo(t.dtype).eps) if t.is_floating_point() else 0.0


def _group_eps(optimizer: Any, param: torch.Tensor) -> float:
    for group in getattr(optimizer, "param_groups", ()):
        if any(p is param for p in group["params"]):
            eps = group.get("eps", 1e-8)
            return float(eps[0] if isinstance(eps, (tuple, list)) else eps)
    return 1e-8


@dataclass
class StepAuditor:
    """Collects a StepObservation for every ``step()`` of the optimizers it watches."""

    names: dict[int, str] = field(default_factory=dict)  # id(param) -> name
    forensics: bool = False
    fingerprint_kinds: bool = True  # name the kind of a mutation (reads optimizer state)
    observations: list[StepObservation] = field(default_factory=list)
    _pending: dict[int, tuple[list[torch.Tensor], list[snapshot.GradFingerprint]]] = field(
        default_factory=dict
    )
    _handles: list[Any] = field(default_factory=list)

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
        self._pending[id(optimizer)] = (params, snapshot.take(params, full=self.forensics))

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
        params, before = pending
        # On an accelerator the optimizer's state is sampled with the grads, so the snapshot
        # stays one transfer; on the CPU (no transfer) it is sampled where a grad mutated.
        on_device = any(p.device.type != "cpu" for p in params)
        sampler = None
        if on_device and self.fingerprint_kinds and not self.forensics:

            def sampler(param: torch.Tensor) -> dict[str, torch.Tensor]:
                return snapshot.state_samples(optimizer, param)

        after = snapshot.take(
            params, full=self.forensics, param_samples=False, before=before, states=sampler
        )
        records = [
            self._compare(optimizer, i, p, a, b)
            for i, (p, a, b) in enumerate(zip(params, before, after, strict=True))
            if a.present
        ]
        self.observations.append(
            StepObservation(
                _global_norm(before),
                _global_norm(after),
                records,
                tuple(snapshot.digest(fp) for fp in before),
            )
        )

    def _compare(
        self,
        optimizer: Any,
        index: int,
        param: torch.Tensor,
        a: snapshot.GradFingerprint,
        b: snapshot.GradFingerprint,
    ) -> ParamStep:
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
        return ParamStep(
            name=self.names.get(id(param), f"param{index}"),
            shape=tuple(param.shape),
            verdict=kind,
            pre_norm=a.norm,
            post_norm=b.norm if b.present else 0.0,
            max_rel_change=change,
            fingerprint=fp,
        )
