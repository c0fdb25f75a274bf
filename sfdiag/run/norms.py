"""The per-step grad norms of ``sfdiag run``: read on every step of every watched
optimizer, so none makes a torch call per grad (``_norms``: one fused norm, or one call of
the C kernel for many small CPU grads); ``GradsRead`` shares one read among the values
logged in a row before ``step()``; ``StepNorms`` keeps a step's norms on the
device until a logged value needs them. The number helpers read what a hook keeps (a
float or a device scalar)."""

from __future__ import annotations

import array
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sfdiag.run.clipping import ClipCall


#: per-tensor norms as ``_norms`` gives them: a float32 torch tensor on the grads' device, or
#: a float32 host array (small CPU grads, read by the C kernel: Python's for a few, numpy's)
Norms = Any


def _dense(grad: torch.Tensor) -> torch.Tensor:
    """The elements whose norm is the grad's here: a DTensor's local shard (combined across
    the ranks by ``StepNorms.globalize``), a sparse grad's coalesced values. (Read under
    ``no_grad``: a grad of ``create_graph=True`` has a graph.)"""
    import torch

    from sfdiag.dist import local

    grad = local(grad)
    if grad.layout != torch.strided:
        return grad.coalesce()._values()
    return grad


def _norms(
    grads: list[torch.Tensor | None], small: bool = True, whole: bool = False
) -> Norms | None:
    """Per-tensor L2 norms (0 for a missing grad), float32 on the first grad's device: a
    host array where the C kernel read them (small CPU grads: no torch op at all), else a
    torch tensor; no host sync (and no index built on the host). None when no grad is
    present. Every step pays this, so it makes no torch call per grad (on a GPU each costs
    the host µs). ``small=False``: the caller found the kernel does not read them
    (``_small_cpu_squares``); ``whole``: it found every grad present, a plain tensor."""
    fast = _small_cpu_norms(grads, whole) if small else None
    if fast is not None:
        return fast
    import torch

    with torch.no_grad():
        present = [(i, _dense(g)) for i, g in enumerate(grads) if g is not None]
        if not present:
            return None
        views = [v for _, v in present]
        device = views[0].device
        try:  # accumulate in float32 also for half-precision grads
            norms = torch._foreach_norm(views, 2, dtype=torch.float32)
        except (TypeError, RuntimeError):
            norms = [n.float() for n in torch._foreach_norm(views)]
        if len(present) < len(grads):
            zero = torch.zeros((), dtype=torch.float32, device=device)
            by_index = dict(zip((i for i, _ in present), norms, strict=True))
            norms = [by_index.get(i, zero) for i in range(len(grads))]
        return torch.stack([n if n.device == device else n.to(device) for n in norms])


def _small_cpu_squares(grads: list[Any], whole: bool = False) -> Any:
    """The present grads' float64 sums of squares (a Python array of doubles), from one
    call of the fused kernel where every one is a small, plain, contiguous CPU tensor of
    one dtype it reads; else None. ``whole``: the caller found every grad present, of
    type ``torch.Tensor`` (two passes over a thousand grads fewer)."""
    from sfdiag.step_audit import fused

    if whole:
        return fused.plain_squares_host(grads, plain=True)
    return fused.plain_squares_host([g for g in grads if g is not None])


#: up to this many grads, their norms are rooted in Python (a hook's numpy call runs cold:
#: a µs or more); above it numpy's vector loop wins
_PYTHON_ROOTS = 64


def _small_cpu_norms(grads: list[torch.Tensor | None], whole: bool = False) -> Any:
    """``_norms`` in one call of the fused kernel where every grad is a small, plain,
    contiguous CPU tensor of one dtype it reads (a model's many small tensors: torch's
    norm costs the host about a microsecond each, the kernel nanoseconds), as float32 on
    the host: a Python array (few grads) or a numpy one, the square roots of its float64
    sums rounded once (torch's ``sqrt`` and ``float`` give the same bits; a torch op costs
    µs where a step's hook runs cold); else None. ``whole``: as ``_small_cpu_squares``."""
    squares = _small_cpu_squares(grads, whole)
    if squares is None:
        return None
    import numpy as np

    if len(squares) <= _PYTHON_ROOTS:
        norms = array.array("f", map(math.sqrt, squares))
    else:
        norms = np.sqrt(np.frombuffer(squares)).astype(np.float32)
    if len(squares) < len(grads):
        full = np.zeros(len(grads), dtype=np.float32)
        full[[i for i, g in enumerate(grads) if g is not None]] = norms
        norms = full
    return norms


def _on_host(norms: Any) -> bool:
    """Whether ``norms`` (``_norms``'s result) is on the host (a Python or numpy array of
    float32: read by the C kernel), not a torch tensor."""
    return type(norms).__module__ in _HOST_MODULES


_HOST_MODULES = frozenset(("array", "numpy"))  # (a numpy array has a ``device`` too)


def _host_copy(norms: Any) -> Any:
    """A numpy copy of host ``norms`` (float32), to edit."""
    import numpy as np

    return np.array(norms, dtype=np.float32)


def _as_torch(norms: Any) -> Any:
    """``norms`` as a torch tensor (the torch path's ops take no host array); None: None."""
    if norms is not None and _on_host(norms):
        import torch

        return torch.from_numpy(_host_copy(norms))
    return norms


@dataclass
class GradsRead:
    """The per-parameter norms of an optimizer's grads read at one moment, and what tells
    whether its grads are still those: the same tensors (held weakly: a freed grad's address
    may be a new one's), at the same versions (an in-place edit, clipping or unscale_, moves
    one), with no backward pass since. Values logged in a row between backward and ``step()``
    read the grads once. (An edit through ``.data`` moves no version: the step reads its
    own pre-step norms, which a value is judged against first.)"""

    backwards: int
    refs: list[Any]
    versions: list[int]
    norms: torch.Tensor | None  # torch's read; None where the kernel gave the total alone
    _total: Any = None

    @classmethod
    def now(
        cls, grads: list[Any], versions: list[int], backwards: int, whole: bool = False
    ) -> GradsRead:
        """``whole``: as ``_small_cpu_squares``'."""
        from sfdiag.step_audit import fused

        refs = fused.weakrefs_of(grads)
        squares = _small_cpu_squares(grads, whole)
        if squares is None:
            return cls(backwards, refs, versions, _norms(grads, small=False))
        # only the total is asked of a read: straight from the kernel's float64 sums, with
        # no torch or numpy op after it (a logging call's read runs cold, one costs µs)
        return cls(backwards, refs, versions, None, math.sqrt(sum(squares)))

    @classmethod
    def of_params(cls, previous: GradsRead | None, params: list[Any], backwards: int) -> GradsRead:
        """``previous`` where it still holds for the grads of ``params``, else a new read of
        them (the grads and their versions read in one pass)."""
        from sfdiag.step_audit import fused

        grads, versions, whole = fused.grads_of(params)
        if previous is not None and previous.holds(grads, versions, backwards):
            return previous
        return cls.now(grads, versions, backwards, whole)

    def holds(self, grads: list[Any], versions: list[int], backwards: int) -> bool:
        from sfdiag.step_audit import fused

        # (what each weak reference refers to, in one call; None for None or a freed one)
        return (
            backwards == self.backwards
            and versions == self.versions
            and len(grads) == len(self.refs)
            and all(map(operator.is_, fused.intact(self.refs, self.versions, ()), grads))
        )

    def total(self) -> Any:
        """The whole-model norm: a device scalar (read when judged), a float where the norms
        are on the CPU (numpy's sum costs a few µs where three torch ops cost ten); None
        without grads."""
        if self._total is None and self.norms is not None:
            if self.norms.device.type == "cpu":
                import numpy as np

                squares = np.square(self.norms.numpy(), dtype=np.float64)
                self._total = math.sqrt(float(squares.sum()))
            else:
                self._total = self.norms.square().sum().sqrt()
        return self._total


@dataclass
class StepNorms:
    """One finished step of one optimizer: per-parameter grad norms around ``step()``."""

    step: int
    pre: Norms | None  # [params] float32, on the device (``_norms``); None: no grad at all
    post: Norms | None
    clip: ClipCall | None = None  # the clipping call that preceded this step, if any
    clipped_indices: frozenset[int] = frozenset()  # the parameters that call covered
    with_grad: frozenset[int] = frozenset()  # the parameters that had a grad
    _floats: tuple[list[float], list[float]] | None = None
    _sums: dict[Any, tuple[float, float]] = field(default_factory=dict)  # scope -> norms
    _references: dict[Any, Any] = field(default_factory=dict)  # scope -> NormReferences
    # a multi-rank job with sharded grads: pre/post are the global norms, and these the
    # ones of this rank's shards alone
    local: tuple[list[float], list[float]] | None = None
    # per param group: (group["lr"] as step() began, the rate the update used, a factor
    # the optimizer applies on top, by name: Prodigy's "d"); numbers or device scalars
    rates: tuple[tuple[Any, Any, str | None], ...] = ()
    # a GradScaler's part: the scale in force at this step and after its update() (floats
    # or device scalars), and whether it skipped the step (found inf/NaN: step() never ran)
    loss_scale: Any = None
    next_scale: Any = None
    skipped: bool = False
    micro_batches: int | None = None  # backward passes since the step before

    def rate(self, group: int) -> tuple[float, float, str | None] | None:
        """(base, applied, scaled_by) of ``group`` as floats; None where there is none."""
        if group >= len(self.rates):
            return None
        base, applied, scaled_by = self.rates[group]
        return _float(base), _float(applied), scaled_by

    # the post-step norms not read yet: the grads as step() left them (weakly held), their
    # versions, and which of them moved (see ``read_post``)
    _later: tuple[list[Any], list[int], list[int]] | None = None
    _lost: Callable[[], None] | None = None  # told when they could not be read any more

    def read_post(self, logging: bool = False) -> None:
        """Read the post-step norms now, while the grads are as ``step()`` left them: a
        logged value may be one of them. A grad since freed or written again leaves the
        post-step norms unknown (NaN): nothing logged is judged against them then.
        ``logging``: a value is being logged right now, after this step; if its grads are
        gone already, the optimizer reads its post-step norms in the hook from now on."""
        if self._later is None:
            return
        import torch

        from sfdiag.step_audit import fused

        refs, versions, moved = self._later
        self._later = None
        grads = fused.intact(refs, versions, moved)
        if grads is None:
            ref = self.pre
            if ref is None:
                self.post = None
            elif _on_host(ref):
                self.post = _host_copy(ref)
                self.post.fill(math.nan)
            else:
                self.post = torch.full_like(ref, math.nan)
            if logging and self._lost is not None:
                self._lost()
        elif len(moved) * 2 > len(grads) or self.pre is None or len(self.pre) != len(grads):
            self.post = _norms(grads)
        else:
            self.post = _patched(self.pre, grads, moved)

    def pre_only(self) -> StepNorms:
        """This step as averages over steps need it: the norms before ``step()`` and the
        clipping call, without what reading the post-step norms would hold on to (a
        reference per grad)."""
        kept = StepNorms(self.step, self.pre, self.pre, self.clip, self.clipped_indices)
        kept.with_grad, kept.local, kept._floats = self.with_grad, self.local, self._floats
        kept.skipped = self.skipped
        return kept

    def floats(self) -> tuple[list[float], list[float]]:
        """The norms as Python floats (one transfer for both, the first time)."""
        if self._floats is None:
            self.read_post()
            pre, post = self.pre, self.post
            if pre is None and post is None:
                self._floats = ([], [])
            elif (pre is None or _on_host(pre)) and (post is None or _on_host(post)):
                size = len(pre if pre is not None else post)
                self._floats = (
                    pre.tolist() if pre is not None else [0.0] * size,
                    post.tolist() if post is not None else [0.0] * size,
                )
            else:
                import torch

                pre, post = _as_torch(pre), _as_torch(post)
                ref = pre if pre is not None else post
                pre = pre if pre is not None else torch.zeros_like(ref)
                post = post if post is not None else torch.zeros_like(ref)
                pre_l, post_l = torch.stack([pre, post.to(pre.device)]).tolist()
                self._floats = (pre_l, post_l)
            self.pre = self.post = None  # the floats are all that is needed from now on
        return self._floats

    def over(self, scope: tuple[int, ...] | None) -> tuple[float, float]:
        """(pre, post) L2 norms over ``scope`` (parameter indices; None: all of them)."""
        sums = self._sums.get(scope)
        if sums is None:
            pre, post = self.floats()
            sums = self._sums[scope] = (_l2(pre, scope), _l2(post, scope))
        return sums

    def scale_updated(self, scale: Any) -> None:
        """The scaler's ``update()`` after this step gave ``scale``: references built before
        it (a value judged in between) are built again with it."""
        self.next_scale = scale
        self._references.clear()

    def references(self, scope: tuple[int, ...] | None) -> Any:
        """This step's ``NormReferences`` over ``scope`` (parameter indices; None: all)."""
        # the same for every value judged against this step over this scope (a script logs
        # several, each judged on its own), as ``over`` is: kept on the step
        kept = self._references.get(scope)
        if kept is not None:
            return kept
        from sfdiag.run.judge import NormReferences

        pre_n, post_n = self.over(scope)
        local_shard = self.local_pre(scope)
        if local_shard is not None and local_shard == pre_n:
            local_shard = None  # nothing of the scope is sharded: no local norm of its own
        pre_clip, clipped = None, False
        clip = self.clip
        if clip is not None:
            coef = clip.coefficient()
            inside = self.with_grad if scope is None else frozenset(scope) & self.with_grad
            if inside and inside <= self.clipped_indices:
                clipped = coef < 1.0
                if scope is None:  # the norm the clipping call returned
                    pre_clip = clip.total_float()
                elif clipped and coef > 0:  # each grad was multiplied by coef
                    pre_clip = pre_n / coef
        refs = self._references[scope] = NormReferences(
            step=self.step,
            pre_step=pre_n,
            post_step=post_n,
            pre_clip=pre_clip,
            clipped=clipped,
            local_shard=local_shard,
            micro_batches=self.micro_batches,
            loss_scale=None if self.loss_scale is None else _float(self.loss_scale),
            next_scale=None if self.next_scale is None else _float(self.next_scale),
            skipped=self.skipped,
        )
        return refs

    def local_pre(self, scope: tuple[int, ...] | None) -> float | None:
        """This rank's shards' pre-step norm over ``scope``; None where nothing is sharded."""
        return None if self.local is None else _l2(self.local[0], scope)

    def globalize(self, channel: Any, sharded: list[tuple[int, int]]) -> None:
        """Make pre/post the job's global norms: the ``sharded`` grads' ``(index,
        replicas)`` local squares, each counted once, summed over every rank (one small
        collective); the other grads are whole on every rank already."""
        import torch

        pre, post = self.floats()
        if not pre:
            return
        local = (list(pre), list(post))
        squares = torch.tensor(
            [pre[i] * pre[i] / r for i, r in sharded] + [post[i] * post[i] / r for i, r in sharded],
            dtype=torch.float64,
        )
        channel.sum(squares)
        totals = squares.sqrt().tolist()
        n = len(sharded)
        for k, (i, _) in enumerate(sharded):
            pre[i], post[i] = totals[k], totals[n + k]
        self.local = local
        self._sums.clear()


def _float(value: Any) -> float:
    return float(value.item()) if hasattr(value, "item") else float(value)


def _number(value: Any) -> Any:
    """A learning rate as read in a hook: a float, or a device scalar left unread (a
    capturable optimizer keeps its rate on the device: reading it would wait for it)."""
    if hasattr(value, "detach"):
        value = value.detach()
        return float(value) if value.device.type == "cpu" else value.clone()
    return value


def _host_float(value: Any) -> float | None:
    """A rate as a float where it is one on the host; None for a device scalar (reading it
    would wait for the device)."""
    if hasattr(value, "detach"):
        return float(value) if value.device.type == "cpu" and value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _own_warmup(group: dict[str, Any]) -> bool:
    """Whether a schedule-free group's own warmup scales this step's rate (k < warmup)."""
    warmup, k = group.get("warmup_steps"), group.get("k")
    return isinstance(warmup, int) and isinstance(k, int) and warmup > 0 and k < warmup


def steps_taken(param_groups: list[dict[str, Any]], state: Any) -> int | None:
    """How many steps an optimizer counts itself, from its ``param_groups`` and ``state``:
    a schedule-free group's ``k``, else the largest ``state[p]["step"]`` (torch's
    optimizers); None where it keeps no count."""
    counts = [g["k"] for g in param_groups if isinstance(g.get("k"), int)]
    if counts:
        return max(counts)
    for per_param in state.values() if isinstance(state, dict) else ():
        step = per_param.get("step") if isinstance(per_param, dict) else None
        if step is not None:
            counts.append(int(_float(step)))
    return max(counts) if counts else None


def _l2(values: list[float], indices: tuple[int, ...] | None) -> float:
    picked = values if indices is None else [values[i] for i in indices if i < len(values)]
    return math.sqrt(math.fsum(map(operator.mul, picked, picked)))  # (no Python a value)


def _patched(pre: Norms | None, grads: list[Any], moved: list[int]) -> Norms | None:
    """``pre`` with the norms of the ``moved`` grads read again (no host sync)."""
    if pre is None:
        return _norms(grads)
    fresh = _norms([grads[i] for i in moved])
    if _on_host(pre) and (fresh is None or _on_host(fresh)):
        out = _host_copy(pre)
        out[moved] = 0.0 if fresh is None else fresh
        return out
    import torch

    pre, fresh = _as_torch(pre), _as_torch(fresh)
    zero = torch.zeros((), dtype=pre.dtype, device=pre.device)
    again = dict(
        zip(moved, fresh.unbind() if fresh is not None else [zero] * len(moved), strict=True)
    )
    return torch.stack(
        [again[i].to(pre.device) if i in again else pre[i] for i in range(len(grads))]
    )
