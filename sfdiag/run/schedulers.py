"""Learning-rate schedulers, tapped: which optimizer's rate a scheduler moved on, and when.

A rate logged after ``scheduler.step()`` under the step just run is the next step's rate
(``next-step``); one the script set itself for the coming step is not. Telling the two
apart needs to know that a scheduler stepped, so ``LRScheduler.step`` is wrapped (every
torch scheduler and Hugging Face's share it), and so is ``step`` on each of torch's own
schedulers that overrides it without calling it (``ReduceLROnPlateau``,
``CosineAnnealingWarmRestarts``). The wrapper calls through unchanged, then tells
``stepped(scheduler)``; it never raises into the script.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

from sfdiag.run.taps._hooks import Patches


def _classes(root: type) -> Iterator[type]:
    yield root
    for sub in root.__subclasses__():
        yield from _classes(sub)


def install(stepped: Callable[[Any], None]) -> Callable[[], None]:
    """Wrap every scheduler ``step`` defined so far; returns the undo."""
    from torch.optim.lr_scheduler import LRScheduler

    patches = Patches()
    for cls in dict.fromkeys(_classes(LRScheduler)):
        original = vars(cls).get("step")
        if original is None or getattr(original, "_sfdiag_tap", False):
            continue

        @functools.wraps(original)
        def step(self: Any, *args: Any, __original=original, **kwargs: Any) -> Any:
            result = __original(self, *args, **kwargs)
            try:
                stepped(self)
            except Exception:  # sfdiag's own bug: the script's schedule goes on
                pass
            return result

        step._sfdiag_tap = True  # type: ignore[attr-defined]
        patches.set(cls, "step", step)
    return patches.undo
