"""Schedule-free AdamW: memory-efficient form (``sf-adamw``) and reference form (``sf-ref``).

Update rules: docs/algorithms.md, "Schedule-free AdamW". The memory-efficient
form keeps only ``z`` and ``v`` and reaches the new ``y`` in place, reusing ``p.grad``
as the buffer for ``u = g / denom + weight_decay * y``: after ``step()``, ``p.grad``
holds ``u``, not the gradient. The reference form keeps ``x``, ``y``, ``z``, ``v`` and
never writes to ``p.grad``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from sfdiag.optim._foreach import (
    columns_by_device_and_dtype,
    local_columns,
    scalar_operand,
    shards,
    tiles_of_group,
)
from sfdiag.optim._schedule import (
    InterpolatedScheduleFree,
    ReferenceScheduleFree,
    StepScalars,
    check_range,
    schedule_defaults,
)

__all__ = ["AdamWScheduleFree", "AdamWScheduleFreeReference"]


def _adam_defaults(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
    *,
    beta1_zero_ok: bool,
) -> dict[str, Any]:
    defaults = schedule_defaults(lr, weight_decay, warmup_steps, r, weight_lr_power)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    check_range(
        "betas[0]",
        betas[0],
        0.0,
        1.0,
        low_open=not beta1_zero_ok,
        high_open=True,
        why="" if beta1_zero_ok else "; eval() recovers x from y by dividing by beta1",
    )
    check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)
    check_range("eps", eps, 0.0)
    defaults.update(betas=tuple(betas), eps=eps)
    return defaults


class AdamWScheduleFree(InterpolatedScheduleFree):
    """Schedule-free AdamW, memory-efficient form: state ``z`` and ``exp_avg_sq`` (v) only.

    ``step()`` divides ``p.grad`` in place by the Adam denominator and adds
    ``weight_decay * y`` to it; the parameter (``y``) and ``z`` are then updated from
    that buffer. Call ``optimizer.train()`` before training and ``optimizer.eval()``
    before evaluating or saving; the optimizer starts in eval mode.

    ``foreach=True`` (default) uses ``torch._foreach_*`` multi-tensor ops; ``False``
    a per-tensor loop. Both write the same values to the parameters and to ``p.grad``.
    ``compile=True`` (opt-in) runs the whole update as one ``torch.compile``-d kernel per
    tensor, a single pass over memory: several times faster on large models on the CPU,
    after a compilation of some seconds on the first step (it needs a C++ compiler there);
    on a GPU the foreach path is faster (a compiled call per tensor costs the host more).
    Where compiling fails the optimizer warns once and goes on with the foreach path.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = True,
        compile: bool = False,
    ) -> None:
        defaults = _adam_defaults(
            lr, betas, eps, weight_decay, warmup_steps, r, weight_lr_power, beta1_zero_ok=False
        )
        defaults["foreach"] = True if foreach is None else bool(foreach)
        defaults["compile"] = bool(compile)
        super().__init__(params, defaults)

    def _interpolation_beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _update(self, group: dict[str, Any], params: list[Tensor], scalars: StepScalars) -> None:
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if "z" not in state:
                state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # columns (y, grad, z, v), no tuple a parameter; a DTensor (FSDP2) is updated
        # through its local shard: the update is elementwise
        columns = local_columns(
            [
                params,
                [p.grad for p in params],
                [state["z"] for state in states],
                [state["exp_avg_sq"] for state in states],
            ]
        )

        beta1, beta2 = group["betas"]
        lr, ckp1 = scalars.lr, scalars.ckp1
        coefficients = dict(
            beta2=beta2,
            bias_correction2=1.0 - beta2 ** (scalars.k + 1),
            eps=group["eps"],
            decay=group["weight_decay"],
            ckp1=ckp1,
            y_alpha=lr * (beta1 * (1.0 - ckp1) - 1.0),
            lr=lr,
        )
        if group.get("compile") and _compiled_rows(zip(*columns, strict=True), coefficients, group):
            return
        if group["foreach"]:
            for same in columns_by_device_and_dtype(columns):
                foreach_coefficients = _foreach_coefficients(coefficients, like=same[0][0])
                for ys, gs, zs, vs in tiles_of_group(same):
                    _multi_tensor_step(ys, gs, zs, vs, **foreach_coefficients)
        else:
            for y, g, z, v in zip(*columns, strict=True):
                _single_tensor_step(y, g, z, v, **coefficients)


def _single_tensor_step(
    y: Tensor,
    g: Tensor,
    z: Tensor,
    v: Tensor,
    *,
    beta2: float,
    bias_correction2: float,
    eps: float,
    decay: float,
    ckp1: float,
    y_alpha: float,
    lr: float,
) -> None:
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = v.div(bias_correction2).sqrt_().add_(eps)
    g.div_(denom)  # p.grad now holds g / denom
    if decay != 0:
        g.add_(y, alpha=decay)  # ... + weight_decay * y
    y.lerp_(z, ckp1)
    y.add_(g, alpha=y_alpha)
    z.sub_(g, alpha=lr)


def _foreach_coefficients(coefficients: dict[str, Any], like: Tensor) -> dict[str, Any]:
    """``coefficients`` for _multi_tensor_step over tensors like ``like``: those its ops take
    as bare scalars as ``scalar_operand`` makes them (the same numbers)."""
    return dict(
        coefficients,
        beta2_operand=scalar_operand(coefficients["beta2"], like),
        bias_correction2=scalar_operand(coefficients["bias_correction2"], like),
        eps=scalar_operand(coefficients["eps"], like),
    )


def _multi_tensor_step(
    ys: list[Tensor],
    gs: list[Tensor],
    zs: list[Tensor],
    vs: list[Tensor],
    *,
    beta2: float,
    beta2_operand: float | Tensor,
    bias_correction2: float | Tensor,
    eps: float | Tensor,
    decay: float,
    ckp1: float,
    y_alpha: float,
    lr: float,
) -> None:
    # The same ops, in the same order, as _single_tensor_step. beta2_operand,
    # bias_correction2 and eps: as _foreach_coefficients makes them (0-dim tensors, on the CPU).
    torch._foreach_mul_(vs, beta2_operand)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
    denom = torch._foreach_div(vs, bias_correction2)
    torch._foreach_sqrt_(denom)
    if isinstance(eps, Tensor):
        torch._foreach_add_(denom, eps, alpha=1)  # alpha: else the number's overload, via .item()
    else:
        torch._foreach_add_(denom, eps)
    torch._foreach_div_(gs, denom)
    del denom
    if decay != 0:
        torch._foreach_add_(gs, ys, alpha=decay)
    torch._foreach_lerp_(ys, zs, ckp1)
    torch._foreach_add_(ys, gs, alpha=y_alpha)
    torch._foreach_sub_(zs, gs, alpha=lr)


def _fused_step(y: Tensor, g: Tensor, z: Tensor, v: Tensor, scalars: Tensor) -> None:
    """The update of _single_tensor_step as one expression, for torch.compile to fuse.

    ``scalars``: float64 [beta2, bias_correction2, eps, decay, ckp1, y_alpha, lr]; each
    unbound element is a 0-dim tensor, which takes the dtype of the tensors it meets.
    """
    beta2, bias_correction2, eps, decay, ckp1, y_alpha, lr = scalars.unbind()
    v_new = v * beta2 + g * g * (1.0 - beta2)
    u = g / ((v_new / bias_correction2).sqrt() + eps) + decay * y
    y_new = y.lerp(z, ckp1) + y_alpha * u
    v.copy_(v_new)
    g.copy_(u)  # p.grad holds u, as on every other path
    z.copy_(z - lr * u)
    y.copy_(y_new)


_COMPILED: dict[str, Any] = {}


def _compiled_kernel() -> Any:
    if "kernel" not in _COMPILED:
        _COMPILED["kernel"] = torch.compile(_fused_step, dynamic=True, fullgraph=True)
    return _COMPILED["kernel"]


def _compiled_rows(
    rows: Iterable[tuple[Tensor, ...]], coefficients: dict[str, float], group: dict[str, Any]
) -> bool:
    """Run the compiled kernel over flat views of every row; False (and the group falls back
    to foreach for good) if compiling fails. Rows with a non-contiguous tensor take the loop."""
    scalars = torch.tensor(
        [coefficients[k] for k in ("beta2", "bias_correction2", "eps", "decay")]
        + [coefficients[k] for k in ("ckp1", "y_alpha", "lr")],
        dtype=torch.float64,
    )
    kernel = _compiled_kernel()
    on_device: dict[torch.device, Tensor] = {}  # one copy to each device, not one per tensor
    for index, row in enumerate(rows):
        if not all(t.is_contiguous() for t in row):
            _single_tensor_step(*row, **coefficients)
            continue
        device = row[0].device
        if device not in on_device:
            on_device[device] = scalars.to(device)
        try:
            kernel(*(t.detach().view(-1) for t in row), on_device[device])
        except Exception as exc:  # no C++ compiler, no triton, an unsupported dtype...
            if index > 0:
                raise  # compiled once already: a real error, not a missing toolchain
            warnings.warn(
                f"AdamWScheduleFree(compile=True): torch.compile failed "
                f"({type(exc).__name__}: {exc}); using the foreach path",
                RuntimeWarning,
                stacklevel=4,
            )
            group["compile"] = False
            return False
    return True


class AdamWScheduleFreeReference(ReferenceScheduleFree):
    """Schedule-free AdamW, reference form: ``x``, ``y``, ``z``, ``v`` in state.

    Never writes to ``p.grad``.

    ``decay_at_z=True`` takes the weight decay at ``z`` instead of ``y``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        decay_at_z: bool = False,
    ) -> None:
        defaults = _adam_defaults(
            lr, betas, eps, weight_decay, warmup_steps, r, weight_lr_power, beta1_zero_ok=True
        )
        defaults["decay_at_z"] = bool(decay_at_z)
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], params: list[Tensor], scalars: StepScalars) -> None:
        beta1, beta2 = group["betas"]
        eps, decay = group["eps"], group["weight_decay"]
        lr = scalars.lr
        bias_correction2 = 1.0 - beta2 ** (scalars.k + 1)
        for p in params:
            state = self._init_reference_state(p)
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            g, z, v, y = shards(p.grad, state["z"], state["exp_avg_sq"], state["y"])

            if decay != 0:
                z.sub_(z if group["decay_at_z"] else y, alpha=lr * decay)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = v.div(bias_correction2).sqrt_().add_(eps)
            z.addcdiv_(g, denom, value=-lr)
            self._average(p, state, scalars.ckp1, beta1)
