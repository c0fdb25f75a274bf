"""The gradient-clipping calls a script makes, recorded for the logged-metric audit.

``torch.nn.utils.clip_grad_norm_`` returns the grads' norm **before** clipping: what
Hugging Face ``Trainer`` logs as ``grad_norm``, and what Lightning and accelerate clip
through. ``sfdiag run`` wraps it (and ``get_total_norm`` / ``clip_grads_with_norm_``,
its two halves) to keep that norm, the ``max_norm`` and which tensors were clipped;
the wrapper hands the call on unchanged and returns what torch returns. The norm stays
a tensor on the device until a logged value is judged against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sfdiag.run.taps._hooks import Patches, guarded


@dataclass
class ClipCall:
    """One clipping call: the norm it measured over ``ids`` (parameters or grads)."""

    ids: frozenset[int]
    total: Any  # the returned norm: a 0-d tensor (or a float)
    max_norm: float | None  # None: only measured (get_total_norm)
    norm_type: float = 2.0
    _total: float | None = None

    def total_float(self) -> float:
        if self._total is None:
            value = self.total
            self._total = float(value.item() if hasattr(value, "item") else value)
            self.total = None
        return self._total

    def coefficient(self) -> float:
        """What torch multiplied the grads by: min(1, max_norm / (total + 1e-6))."""
        if self.max_norm is None:
            return 1.0
        total = self.total_float()
        if math.isnan(total):
            return math.nan
        return min(1.0, self.max_norm / (total + 1e-6))


@dataclass
class ClipLog:
    """Every clipping call of the run, in order (only the recent ones are kept)."""

    calls: list[ClipCall] = field(default_factory=list)
    count: int = 0  # calls recorded since the start (the index of the next one)
    keep: int = 64

    def __len__(self) -> int:
        return self.count

    def record(self, call: ClipCall) -> None:
        self.calls.append(call)
        self.count += 1
        if len(self.calls) > self.keep:
            del self.calls[: len(self.calls) - self.keep]

    def latest_since(
        self, mark: int, ids: set[int] | frozenset[int], tensors: Sequence[Any] = ()
    ) -> ClipCall | None:
        """The last call after call number ``mark`` that clipped anything in ``ids`` or any
        of ``tensors`` (None among them: no tensor). Their ids are looked up one at a time,
        up to the first found: a step of a thousand grads builds no set of them."""
        first_kept = self.count - len(self.calls)
        # one of each first: a call clips a model's every parameter, or every grad, as a rule
        probes = {id(t) for t in tensors[:1] if t is not None}
        if ids:
            probes.add(next(iter(ids)))
        for call in reversed(self.calls[max(0, mark - first_kept) :]):
            if (
                not call.ids.isdisjoint(probes)
                or not call.ids.isdisjoint(ids)
                or not call.ids.isdisjoint(id(t) for t in tensors if t is not None)
            ):
                return call
        return None


def _tensors(parameters: Any) -> tuple[Any, frozenset[int]]:
    """What to hand on (a list where a one-shot iterator came) and the ids of what is in
    it (one set a call, no Python a tensor: a model's every grad may pass here each step;
    an id of something else in the list matches no tensor's)."""
    import torch

    if isinstance(parameters, torch.Tensor):
        return parameters, frozenset((id(parameters),))
    materialized = list(parameters) if not isinstance(parameters, list) else parameters
    return materialized, frozenset(map(id, materialized))


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _clip_grad_norm(original: Callable[..., Any], log: ClipLog) -> Callable[..., Any]:
    def clip_grad_norm_(parameters: Any, max_norm: Any, *args: Any, **kwargs: Any) -> Any:
        parameters, ids = _tensors(parameters)
        total = original(parameters, max_norm, *args, **kwargs)
        norm_type = kwargs.get("norm_type", args[0] if args else 2.0)
        log.record(
            ClipCall(
                ids,
                _detached(total),
                _float_or_none(max_norm),
                _float_or_none(norm_type) or 2.0,
            )
        )
        return total

    return clip_grad_norm_


def _get_total_norm(original: Callable[..., Any], log: ClipLog) -> Callable[..., Any]:
    def get_total_norm(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        tensors, ids = _tensors(tensors)
        total = original(tensors, *args, **kwargs)
        norm_type = kwargs.get("norm_type", args[0] if args else 2.0)
        log.record(
            ClipCall(
                ids,
                _detached(total),
                None,
                _float_or_none(norm_type) or 2.0,
            )
        )
        return total

    return get_total_norm


def _clip_grads_with_norm(original: Callable[..., Any], log: ClipLog) -> Callable[..., Any]:
    def clip_grads_with_norm_(parameters: Any, max_norm: Any, total_norm: Any, *a: Any, **k: Any):
        parameters, ids = _tensors(parameters)
        result = original(parameters, max_norm, total_norm, *a, **k)
        log.record(ClipCall(ids, _detached(total_norm), _float_or_none(max_norm)))
        return result

    return clip_grads_with_norm_


def _detached(value: Any) -> Any:
    """``value`` without a graph to hold on to (torch's clipping functions run under
    ``no_grad``: as a rule there is none, and no torch call is made)."""
    if getattr(value, "requires_grad", None) is False:  # (a graph's tensors require grad)
        return value
    detach = getattr(value, "detach", None)
    return detach() if callable(detach) else value


_WRAPPERS = {
    "clip_grad_norm_": _clip_grad_norm,
    "get_total_norm": _get_total_norm,
    "clip_grads_with_norm_": _clip_grads_with_norm,
}


def install(log: ClipLog, is_active: Callable[[], bool]) -> Patches:
    """Wrap torch's public clipping functions where they are looked up; undo with
    ``.undo()``. Each wrapper records only where no other wrapper is running (torch's own
    calls between them are not recorded twice)."""
    import torch.nn.utils as utils
    import torch.nn.utils.clip_grad as clip_grad

    patches = Patches()
    for name, make in _WRAPPERS.items():
        original = getattr(utils, name, None)
        if original is None:  # an older torch without this function
            continue
        wrapper = guarded(original, make(original, log), is_active)
        for owner in (utils, clip_grad):
            if getattr(owner, name, None) is original:
                patches.set(owner, name, wrapper)
    return patches
