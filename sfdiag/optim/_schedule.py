"""What every schedule-free optimizer shares: the schedule, the modes, the step scaffold.

The schedule (docs/algorithms.md, "The schedule") is computed here and nowhere else:

    sched_k = (k+1) / warmup_steps  if k < warmup_steps  else 1
    lr_k    = lr * sched_k                      -> group['scheduled_lr']
    lr_max  = max(lr_max, lr_k)                 -> group['lr_max']  (starts at -1)
    w_k     = (k+1)**r * lr_max**weight_lr_power
    W      += w_k                               -> group['weight_sum']  (starts at 0)
    c_k     = w_k / W                           (0 if W == 0)

Every scalar lives in the parameter group, so ``state_dict()`` carries it. The
optimizers themselves only say how to update one group given ``lr_k`` and ``c_k``
(``_update``) and how to move a parameter between ``y`` and ``x`` (``_swap``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sfdiag.optim._foreach import columns_by_device_and_dtype, local_columns, shards

__all__ = [
    "ScheduleFreeOptimizer",
    "InterpolatedScheduleFree",
    "ReferenceScheduleFree",
    "StepScalars",
    "advance_schedule",
    "check_range",
    "schedule_defaults",
]


@dataclass(frozen=True)
class StepScalars:
    """The per-group scalars of one step."""

    k: int  # steps already taken (0 on the first step)
    lr: float  # lr_k: the warmed-up learning rate
    ckp1: float  # c_k: the weight of the new z in the average x


def advance_schedule(group: dict[str, Any]) -> StepScalars:
    """Compute this step's ``lr_k`` and ``c_k``, record them in ``group``, advance ``k``."""
    k = group["k"]
    warmup_steps = group["warmup_steps"]
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    lr = group["lr"] * sched
    group["scheduled_lr"] = lr
    lr_max = group["lr_max"] = max(lr, group["lr_max"])
    weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = group["weight_sum"] = group["weight_sum"] + weight
    ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
    group["k"] = k + 1
    return StepScalars(k=k, lr=lr, ckp1=ckp1)


# ----------------------------------------------------------------------------- validation


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    why: str = "",
) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a finite number in the interval."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        expected = "an int" if integer else "a finite number"
        raise ValueError(f"invalid {name}: {value!r} (expected {expected})")
    below = value <= low if low_open else value < low
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"invalid {name}: {value!r} (must be in {lo}, {hi}){why}")


def schedule_defaults(
    lr: float, weight_decay: float, warmup_steps: int, r: float, weight_lr_power: float
) -> dict[str, Any]:
    """Validate the shared hyperparameters; return them with the schedule's starting scalars."""
    check_range("lr", lr, 0.0)
    check_range("weight_decay", weight_decay, 0.0)
    check_range("warmup_steps", warmup_steps, 0, integer=True)
    check_range("r", r, 0.0)
    check_range("weight_lr_power", weight_lr_power, 0.0)
    return dict(
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
        # the schedule's running scalars (per group, so they survive state_dict())
        k=0,
        scheduled_lr=0.0,
        lr_max=-1.0,
        weight_sum=0.0,
        # optimizers start in eval mode: call optimizer.train() before training
        train_mode=False,
    )


# ----------------------------------------------------------------------------- base classes


class ScheduleFreeOptimizer(torch.optim.Optimizer):
    """Base class: schedule, train/eval mode bookkeeping and the ``step()`` scaffold.

    Subclasses implement ``_update(group, params, scalars)`` (params: those with a
    gradient, state possibly not yet created) and ``_swap(group, to_train)``.
    """

    # -- modes ---------------------------------------------------------------------------

    @property
    def train_mode(self) -> bool:
        """True when every group is in train mode (parameters hold ``y``)."""
        return all(group["train_mode"] for group in self.param_groups)

    @torch.no_grad()
    def train(self) -> None:
        """Switch every parameter to ``y``, the point where gradients are taken."""
        self._set_mode(True)

    @torch.no_grad()
    def eval(self) -> None:
        """Switch every parameter to ``x``, the averaged iterate (evaluate and save here)."""
        self._set_mode(False)

    def _set_mode(self, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] != to_train:
                self._swap(group, to_train)
                group["train_mode"] = to_train

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # A group added after train() joins in the current mode: its parameters have no
        # state yet, so x == y == z and nothing needs to move.
        existing = list(getattr(self, "param_groups", ()))
        explicit = "train_mode" in param_group
        super().add_param_group(param_group)
        if existing and not explicit:
            self.param_groups[-1]["train_mode"] = all(g["train_mode"] for g in existing)

    def _require_train_mode(self) -> None:
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError(
                f"{type(self).__name__}.step() was called in eval mode: call optimizer.train() "
                "before training steps (schedule-free optimizers start in eval mode), and "
                "optimizer.eval() before evaluating or saving a checkpoint"
            )

    # -- step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; returns the closure's loss (None without a closure)."""
        self._require_train_mode()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        for group in self.param_groups:
            params = []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
            work.append((group, params))

        for group, params in work:
            scalars = advance_schedule(group)
            if params:
                self._update(group, params, scalars)
        return loss

    def _update(self, group: dict[str, Any], params: list[Tensor], scalars: StepScalars) -> None:
        raise NotImplementedError

    def _swap(self, group: dict[str, Any], to_train: bool) -> None:
        raise NotImplementedError


class InterpolatedScheduleFree(ScheduleFreeOptimizer):
    """Memory-efficient forms: only ``y`` (or ``x``) and ``z`` are kept; modes swap by lerp.

    With ``y = b*x + (1-b)*z``:
    eval: ``p = lerp(p, z, 1 - 1/b)`` (y -> x);  train: ``p = lerp(p, z, 1 - b)`` (x -> y).
    """

    def _interpolation_beta(self, group: dict[str, Any]) -> float:
        """``b``: betas[0] for Adam, momentum for SGD."""
        raise NotImplementedError

    def _swap(self, group: dict[str, Any], to_train: bool) -> None:
        b = self._interpolation_beta(group)
        weight = 1.0 - b if to_train else 1.0 - 1.0 / b
        params = [p for p in group["params"] if "z" in self.state[p]]
        columns = local_columns([params, [self.state[p]["z"] for p in params]])
        if group.get("foreach", False):
            for ps, zs in columns_by_device_and_dtype(columns):
                torch._foreach_lerp_(ps, zs, weight)
        else:
            for p, z in zip(*columns, strict=True):
                p.lerp_(z, weight)


class ReferenceScheduleFree(ScheduleFreeOptimizer):
    """Reference forms: ``x``, ``y``, ``z`` kept explicitly; ``p.grad`` is never written."""

    def _swap(self, group: dict[str, Any], to_train: bool) -> None:
        key = "y" if to_train else "x"
        for p in group["params"]:
            state = self.state[p]
            if key in state:
                target, source = shards(p, state[key])
                target.copy_(source)

    def _init_reference_state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if "z" not in state:
            for key in ("z", "x", "y"):
                state[key] = p.detach().clone(memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _average(p: Tensor, state: dict[str, Tensor], ckp1: float, beta: float) -> None:
        """After the z step: ``x = (1-c) x + c z``, ``y = b x + (1-b) z``, ``p = y``."""
        x, y, z, target = shards(state["x"], state["y"], state["z"], p)
        x.mul_(1.0 - ckp1).add_(z, alpha=ckp1)
        torch.mul(x, beta, out=y)
        y.add_(z, alpha=1.0 - beta)
        target.copy_(y)
