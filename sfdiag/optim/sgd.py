"""Schedule-free SGD: the memory-efficient form (``sf-sgd``) and the reference form.

Update rules: docs/algorithms.md, "Schedule-free SGD". The memory-efficient
form folds the weight decay into ``p.grad`` in place (``g += weight_decay * y``) when
``weight_decay > 0`` and leaves it untouched otherwise. The reference form keeps
``x``, ``y``, ``z`` and never writes to ``p.grad``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from sfdiag.optim._foreach import local_columns, shards, tiles_of_columns
from sfdiag.optim._schedule import (
    InterpolatedScheduleFree,
    ReferenceScheduleFree,
    StepScalars,
    check_range,
    schedule_defaults,
)

__all__ = ["SGDScheduleFree", "SGDScheduleFreeReference"]


class SGDScheduleFree(InterpolatedScheduleFree):
    """Schedule-free SGD, memory-efficient form: state ``z`` only.

    With ``weight_decay > 0``, ``step()`` adds ``weight_decay * y`` to ``p.grad`` in
    place. Call ``optimizer.train()`` before training and ``optimizer.eval()`` before
    evaluating or saving; the optimizer starts in eval mode.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = True,
    ) -> None:
        defaults = schedule_defaults(lr, weight_decay, warmup_steps, r, weight_lr_power)
        check_range(
            "momentum",
            momentum,
            0.0,
            1.0,
            low_open=True,
            high_open=True,
            why="; eval() recovers x from y by dividing by momentum",
        )
        defaults.update(momentum=momentum, foreach=True if foreach is None else bool(foreach))
        super().__init__(params, defaults)

    def _interpolation_beta(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def _update(self, group: dict[str, Any], params: list[Tensor], scalars: StepScalars) -> None:
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if "z" not in state:
                state["z"] = p.detach().clone(memory_format=torch.preserve_format)
        # columns (y, grad, z), no tuple a parameter; a DTensor: its local shard
        columns = local_columns(
            [params, [p.grad for p in params], [state["z"] for state in states]]
        )

        lr, ckp1 = scalars.lr, scalars.ckp1
        decay = group["weight_decay"]
        y_alpha = lr * (group["momentum"] * (1.0 - ckp1) - 1.0)
        if group["foreach"]:
            for ys, gs, zs in tiles_of_columns(columns):
                if decay != 0:
                    torch._foreach_add_(gs, ys, alpha=decay)
                torch._foreach_lerp_(ys, zs, ckp1)
                torch._foreach_add_(ys, gs, alpha=y_alpha)
                torch._foreach_sub_(zs, gs, alpha=lr)
        else:
            for y, g, z in zip(*columns, strict=True):
                if decay != 0:
                    g.add_(y, alpha=decay)
                y.lerp_(z, ckp1)
                y.add_(g, alpha=y_alpha)
                z.sub_(g, alpha=lr)


class SGDScheduleFreeReference(ReferenceScheduleFree):
    """Schedule-free SGD, reference form: ``x``, ``y``, ``z`` in state; ``p.grad`` untouched."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
    ) -> None:
        defaults = schedule_defaults(lr, weight_decay, warmup_steps, r, weight_lr_power)
        check_range("momentum", momentum, 0.0, 1.0, high_open=True)
        defaults["momentum"] = momentum
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], params: list[Tensor], scalars: StepScalars) -> None:
        lr, decay = scalars.lr, group["weight_decay"]
        for p in params:
            state = self._init_reference_state(p)
            z, y, g = shards(state["z"], state["y"], p.grad)
            if decay != 0:
                z.sub_(y, alpha=lr * decay)
            z.sub_(g, alpha=lr)
            self._average(p, state, scalars.ckp1, group["momentum"])
