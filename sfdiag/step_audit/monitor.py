"""``GradMonitor``: the real gradient norm of every step, whatever ``step()`` does to p.grad.

Some optimizers (schedule-free AdamW's memory-efficient form among them) reuse
``p.grad`` as a work buffer: after ``step()`` it holds the update, not the gradient,
and a grad norm logged after ``step()`` is off by orders of magnitude. A monitor
reads the global L2 norm of the grads in the optimizer's step **pre**-hook, where
they are still the gradients, and again in the post-hook::

    monitor = sfdiag.GradMonitor(optimizer)
    for x, y in batches:
        ...
        loss.backward()
        optimizer.step()
        log(grad_norm=monitor.last_grad_norm)   # the norm step() was given

Cost per step: one ``torch._foreach_norm`` and one stack+norm in each hook, no copy
of any gradient, and the numbers stay on the device until read: at most one host
sync per step (none until a property is read).

``post_step_grad_norm`` is the norm of ``p.grad`` after ``step()``; it is **not** the
norm of the parameter update (that would need a copy of the old parameters). It
equals the pre-step norm when the optimizer leaves the grads alone, so ``mutated``
compares the two norms bit for bit: cheap, and blind to a change that keeps the norm
(a permutation, say). ``sfdiag run`` and ``sfdiag.testing`` audit every element.

A compiled ``step()`` runs the hooks eagerly between its graphs, on the real grads
(``sfdiag.step_audit.compiling``); a step compiled into one graph (``fullgraph=True``) runs none,
so from the first such step the norms read NaN, never a stale step's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sfdiag.step_audit.auditor import active_steps
from sfdiag.step_audit.compiling import step_hook
from sfdiag.step_audit.snapshot import float_bits

__all__ = ["GradMonitor"]

#: finished steps kept on the device before one transfer brings them all to the host
_SYNC_EVERY = 1024


def _grads(optimizer: Any) -> list[torch.Tensor]:
    """The optimizer's grads as read here (a sparse one's stored values; read them under
    ``no_grad``: a grad of ``create_graph=True`` has a graph)."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:  # sparse: the stored values, duplicates summed
                g = g.coalesce()._values()
            out.append(g)
    return out


@torch.no_grad()
def global_norm(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The L2 norm over all ``grads`` as a float32 0-d tensor on the first one's device.

    No host sync: one ``torch._foreach_norm`` (one kernel per device and dtype), then
    one stack and norm, and no torch call per grad (on a GPU each costs the host µs, in
    both hooks of every step). ``None`` when there are no grads.
    """
    if not grads:
        return None
    device = grads[0].device
    try:  # accumulate in float32 also for half-precision grads
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    except (TypeError, RuntimeError):  # an older torch without dtype=
        norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(
        torch.stack(
            [
                n
                if n.device == device and n.dtype == torch.float32
                else n.to(device, torch.float32)
                for n in norms
            ]
        )
    )


class GradMonitor:
    """Records the global grad norm before and after every ``step()`` of ``optimizer``.

    ``last_grad_norm`` is the norm of the gradients ``step()`` was given: log that.
    Use ``remove()`` (or a ``with`` block) to detach the hooks. With
    ``keep_history=False`` only the last step is kept.
    """

    def __init__(self, optimizer: Any, *, keep_history: bool = True) -> None:
        self.optimizer = optimizer
        self.keep_history = keep_history
        self._pending_pre: torch.Tensor | None = None  # this step's pre norm, not synced
        self._unsynced: list[torch.Tensor | None] = []  # per finished step: [pre, post]
        self._history: list[tuple[float, float]] = []
        self._last: tuple[float, float] | None = None
        self._steps = 0
        self._unseen = False  # a compiled step() ran where no hook could (fullgraph=True)
        self._handles = [  # a compiled step() runs them eagerly (sfdiag.step_audit.compiling)
            optimizer.register_step_pre_hook(step_hook(self._pre, self._steps_unseen)),
            optimizer.register_step_post_hook(step_hook(self._post)),
        ]

    # ---- hooks ----------------------------------------------------------------------------
    def _pre(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if active_steps(optimizer) > 1:  # a subclass's step() calling super().step()
            return None
        self._pending_pre = global_norm(_grads(optimizer))
        return self._wrap_closure(args, kwargs)

    def _post(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if active_steps(optimizer) > 1:
            return
        pre, self._pending_pre = self._pending_pre, None
        post = global_norm(_grads(optimizer))
        if pre is None and post is None:
            pair = None
        else:
            device = (pre if pre is not None else post).device
            zero = torch.zeros((), dtype=torch.float32, device=device)
            pair = torch.stack(
                [
                    pre if pre is not None else zero,
                    (post if post is not None else zero).to(device),
                ]
            )
        if not self.keep_history:
            self._unsynced.clear()
        self._unsynced.append(pair)
        self._steps += 1
        if len(self._unsynced) >= _SYNC_EVERY:  # bound the device memory held
            self._sync()

    def _steps_unseen(self, optimizer: Any) -> None:
        """dynamo traced ``step()`` into a graph that must not break: the hooks do not run
        in it, so the norms of its steps are unknown (NaN from now on), not the last seen."""
        self._unseen = True

    def _wrap_closure(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """step(closure) recomputes the grads: take the pre-step norm after each call."""
        if len(args) > 1 and callable(args[1]):
            closure = args[1]
        elif callable(kwargs.get("closure")):
            closure = kwargs["closure"]
        else:
            return None

        def closure_then_norm(*a: Any, **k: Any) -> Any:
            loss = closure(*a, **k)
            self._pending_pre = global_norm(_grads(self.optimizer))
            return loss

        if len(args) > 1 and args[1] is closure:
            return (args[0], closure_then_norm, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_norm}

    # ---- reading --------------------------------------------------------------------------
    def _sync(self) -> None:
        """Bring finished steps' norms to the host: one transfer for all of them."""
        if not self._unsynced:
            return
        pending, self._unsynced = self._unsynced, []
        present = [p for p in pending if p is not None]
        values = torch.stack([p.to(present[0].device) for p in present]).tolist() if present else []
        it = iter(values)
        pairs = [(0.0, 0.0) if p is None else tuple(next(it)) for p in pending]
        if self.keep_history:
            self._history.extend(pairs)  # type: ignore[arg-type]
        self._last = pairs[-1]  # type: ignore[assignment]

    @property
    def steps(self) -> int:
        """Steps recorded so far."""
        return self._steps

    @property
    def last_grad_norm(self) -> float:
        """The global L2 norm of the grads ``step()`` was given, last step (NaN before any)."""
        self._sync()
        return self._last[0] if self._last is not None and not self._unseen else math.nan

    @property
    def last_post_step_grad_norm(self) -> float:
        """The global L2 norm of ``p.grad`` just after the last ``step()`` (NaN before any)."""
        self._sync()
        return self._last[1] if self._last is not None and not self._unseen else math.nan

    @property
    def history(self) -> list[tuple[float, float]]:
        """``(pre, post)`` per step (a copy); empty when ``keep_history=False``."""
        self._sync()
        return list(self._history)

    @property
    def mutated(self) -> bool:
        """True when the last step's post-step grad norm differs (bitwise) from the pre-step one.

        NaN counts as equal to NaN. False before any step.
        """
        self._sync()
        if self._last is None or self._unseen:
            return False
        pre, post = self._last
        return float_bits(pre) != float_bits(post) and not (math.isnan(pre) and math.isnan(post))

    # ---- lifetime -------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach the hooks (idempotent). What was recorded stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> GradMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"GradMonitor({type(self.optimizer).__name__}, steps={self._steps}, "
            f"last_grad_norm={self.last_grad_norm:.4g})"
        )
