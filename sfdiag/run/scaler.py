"""Loss scaling and backward passes, seen: what a gradient norm logged mid-step was.

A norm logged before ``scaler.unscale_(optimizer)`` is the gradient's times the loss scale;
one logged after the first of several backward passes is a partial sum. Telling these
apart from a wrong number needs to know, per optimizer step:

- **the scale in force** and whether ``unscale_`` ran before the step: ``torch.amp.GradScaler``
  (``torch.cuda.amp.GradScaler`` is the same class underneath) has ``scale``, ``unscale_``,
  ``step`` and ``update`` wrapped; each calls through unchanged. Its ``step`` is where a
  scaler that found inf/NaN skips ``optimizer.step()``: no step hook runs then, so the
  attempt is recorded here, with the norms of the grads it was given, as a skipped step;
- **how many backward passes** made the step's gradient: ``torch.autograd.backward``
  (which ``Tensor.backward`` calls) is wrapped to count them: one Python call a backward,
  nothing per tensor.

Nothing here reads a device value: the scale is kept as the device scalar it is (read when
a logged value is judged); a skipped attempt's norms are one fused norm, as a step's.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sfdiag.run.taps._hooks import Patches

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.run.watch import OptimizerWatch, Watched


class Backwards:
    """How many backward passes have run since ``install``."""

    def __init__(self) -> None:
        self.count = 0

    def install(self) -> Callable[[], None]:
        import torch.autograd

        patches = Patches()
        original = torch.autograd.backward
        if getattr(original, "_sfdiag_tap", False):
            return patches.undo

        @functools.wraps(original)
        def backward(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self.count += 1  # after it: a backward that raised wrote no grad
            return result

        backward._sfdiag_tap = True  # type: ignore[attr-defined]
        patches.set(torch.autograd, "backward", backward)
        return patches.undo


def _scale_of(scaler: Any) -> Any:
    """The scale in force, left on its device (a float on the CPU); None when disabled."""
    if not getattr(scaler, "_enabled", False):
        return None
    from sfdiag.run.norms import _number  # a device scalar as the step hooks keep one

    scale = getattr(scaler, "_scale", None)
    return None if scale is None else _number(scale)


class ScalerWatch:
    """``GradScaler``'s calls, told to the optimizer watch's entries (see the module doc)."""

    def __init__(self, watch: OptimizerWatch, backwards: Backwards) -> None:
        self.watch = watch
        self.backwards = backwards
        self.scaled = 0  # losses scaled by an enabled scaler so far
        # per scaler (by id): the entries it stepped since its last update()
        self._since_update: dict[int, list[Watched]] = {}

    def install(self) -> Callable[[], None]:
        from torch.amp import GradScaler

        patches = Patches()
        for name, after in (
            ("scale", self._scaled),
            ("unscale_", self._unscaled),
            ("update", self._updated),
        ):
            self._wrap(patches, GradScaler, name, after)
        original = vars(GradScaler).get("step")
        if original is not None and not getattr(original, "_sfdiag_tap", False):
            watch = self

            @functools.wraps(original)
            def step(scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
                entry, began = watch._before_step(scaler, optimizer)
                result = original(scaler, optimizer, *args, **kwargs)
                watch._after_step(scaler, optimizer, entry, began)
                return result

            step._sfdiag_tap = True  # type: ignore[attr-defined]
            patches.set(GradScaler, "step", step)
        return patches.undo

    @staticmethod
    def _wrap(patches: Patches, cls: type, name: str, after: Callable[..., None]) -> None:
        original = vars(cls).get(name)
        if original is None or getattr(original, "_sfdiag_tap", False):
            return

        @functools.wraps(original)
        def call(scaler: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(scaler, *args, **kwargs)
            try:
                after(scaler, *args, **kwargs)
            except Exception:  # sfdiag's own bug: the script's scaler goes on
                pass
            return result

        call._sfdiag_tap = True  # type: ignore[attr-defined]
        patches.set(cls, name, call)

    # ---- what the scaler did -------------------------------------------------------------
    def _scaled(self, scaler: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(scaler, "_enabled", False):
            self.scaled += 1

    def _unscaled(self, scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(scaler, "_enabled", False):
            self.watch._entry(optimizer, sys._getframe(2)).unscaled = True

    def _updated(self, scaler: Any, *args: Any, **kwargs: Any) -> None:
        scale = _scale_of(scaler)
        for entry in self._since_update.pop(id(scaler), []):
            last = entry.skipped_attempt or (entry.recent[-1] if entry.recent else None)
            if last is not None and last.loss_scale is not None:
                last.scale_updated(scale)

    def _before_step(self, scaler: Any, optimizer: Any) -> tuple[Watched | None, int]:
        try:
            entry = self.watch._entry(optimizer, sys._getframe(2))
            entry.step_scale = _scale_of(scaler)
            return entry, entry.started
        except Exception:
            return None, -1

    def _after_step(self, scaler: Any, optimizer: Any, entry: Watched | None, began: int) -> None:
        """The step ran (its hooks recorded it, with the scale) or the scaler skipped it:
        then the attempt is recorded here, as its hooks would have."""
        if entry is None:
            return
        try:
            scale, entry.step_scale = entry.step_scale, None
            if scale is None:  # a disabled scaler: a plain step
                return
            stepped = self._since_update.setdefault(id(scaler), [])
            if not any(e is entry for e in stepped):  # bounded, whether or not update() runs
                stepped.append(entry)
            if entry.started != began or entry.error is not None:
                return
            norms = entry.skipped(scale, self.backwards.count)
            if norms is not None:
                self.watch._tell("skipped", entry, optimizer, norms)
        except Exception as exc:
            self.watch._give_up(optimizer, exc)
