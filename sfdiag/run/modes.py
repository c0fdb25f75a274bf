"""Schedule-free modes: evaluating, saving and stepping at the wrong point.

A schedule-free optimizer keeps two points: gradients are taken at ``y`` (train mode),
the weights to evaluate and save are ``x``, and only ``optimizer.eval()`` puts ``x`` in
the model (``optimizer.train()`` swaps back). ``ModeWatch`` watches every optimizer
that has modes (``train()``, ``eval()`` and a ``train_mode`` flag: sfdiag's and the
public release's) once it first steps, and records:

- ``eval-in-train-mode``: a forward pass of a module holding its parameters, run for
  evaluation (the module in eval mode, or under ``no_grad`` / ``inference_mode``), with
  the optimizer in train mode; the harm, ``||x - y|| / ||x||``, is read from the
  optimizer's state (once per step, one tensor at a time; the parameters are not
  touched);
- ``checkpoint-in-train-mode``: ``torch.save`` (or safetensors' ``save_file``) of
  anything that holds those parameters or a ``state_dict()`` of them, in train mode;
- ``batchnorm-stats``: a model with BatchNorm running statistics evaluated after
  training steps without a refresh at ``x`` (forward passes in ``model.train()`` under
  ``no_grad`` with the optimizer in eval mode) since the last step;
- ``step-in-eval-mode``: a ``step()`` that ran with the optimizer in eval mode.

An evaluation counts once per optimizer step, however many batches and modules it runs.
Cost: once a schedule-free optimizer steps, torch's global forward pre-hook (nothing is
stored on the user's modules), a dict lookup per module call and a flag read or two for
the few modules that hold its parameters (the model, and its children that do); nothing
at all while no schedule-free optimizer has stepped; one check per ``torch.save``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from sfdiag.run.findings import ModeTally, mode_findings
from sfdiag.run.taps._hooks import Patches, when_imported

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.results import Finding
    from sfdiag.run.watch import Watched

#: modules hooked per optimizer at most (the model, then its children holding parameters)
MAX_HOOKED = 64
#: steps at which ||x - y|| / ||x|| is read, at most (each read is a pass over the weights)
MAX_GAP_READS = 200
#: what torch.save's check walks of the object saved, at most
_MAX_ITEMS = 100_000
_MAX_DEPTH = 8


def train_mode_of(optimizer: Any) -> bool | None:
    """True / False for an optimizer with modes in train / eval mode; None: no modes."""
    if not (
        callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))
    ):
        return None
    try:
        mode = getattr(optimizer, "train_mode", None)  # sfdiag's property, the release's wrapper
    except Exception:
        mode = None
    if isinstance(mode, bool):
        return mode
    flags = [group.get("train_mode") for group in getattr(optimizer, "param_groups", ())]
    if flags and all(isinstance(flag, bool) for flag in flags):
        return all(flags)
    return None


def _beta(group: dict[str, Any]) -> float | None:
    """The interpolation weight b of y = b x + (1 - b) z: Adam's beta1, SGD's momentum."""
    if "betas" in group:
        return float(group["betas"][0])
    momentum = group.get("momentum")
    return float(momentum) if momentum is not None else None


def gap(optimizer: Any) -> float | None:
    """``||x - y|| / ||x||`` now, with the parameters at ``y`` (train mode): from ``x`` in
    the optimizer's state (reference forms) or from ``z`` and ``b`` (the memory-efficient
    forms, x = (y - (1 - b) z) / b). One tensor at a time; a DTensor by its local shard."""
    import torch

    from sfdiag.dist import local

    diff_sq = x_sq = 0.0
    with torch.no_grad():
        for group in optimizer.param_groups:
            beta = _beta(group)
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                y = local(p).detach()
                if "x" in state:
                    x = local(state["x"]).detach()
                    diff_sq += float(torch.linalg.vector_norm(x - y, dtype=torch.float64) ** 2)
                    x_sq += float(torch.linalg.vector_norm(x, dtype=torch.float64) ** 2)
                elif "z" in state and beta:
                    z = local(state["z"]).detach()
                    d = float(torch.linalg.vector_norm(y - z, dtype=torch.float64))
                    diff_sq += (d * (1.0 - beta) / beta) ** 2
                    x = torch.sub(y, z, alpha=1.0 - beta)
                    x_sq += float(torch.linalg.vector_norm(x, dtype=torch.float64) / beta) ** 2
                else:  # no state yet: x == y here
                    x_sq += float(torch.linalg.vector_norm(y, dtype=torch.float64) ** 2)
    if x_sq == 0:
        return None
    return math.sqrt(diff_sq) / math.sqrt(x_sq)


def _has_batchnorm(modules: list[Any]) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(
        isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
        for root in modules
        for m in root.modules()
    )


@dataclass
class _Watching:
    """One optimizer with modes, and the modules that hold its parameters."""

    label: str
    ref: Callable[[], Any]
    entry: Watched
    storages: set[int]  # the storages of its parameters (a state_dict() shares them)
    has_batchnorm: bool = False
    stepping_in_eval: bool = False
    refreshed_at: int = -1  # the last step after which BatchNorm statistics were refreshed
    stale_steps: set[int] = field(default_factory=set)  # evaluated with stale statistics
    evaluated_steps: set[int] = field(default_factory=set)  # evaluated in train mode

    @property
    def step(self) -> int:
        return self.entry.last_finished


def _storage(t: Any) -> int | None:
    from sfdiag.dist import local

    try:
        return local(t).untyped_storage().data_ptr()
    except Exception:
        return None


class ModeWatch:
    """An observer of ``OptimizerWatch`` (see the module doc)."""

    def __init__(self, is_active: Callable[[], bool] = lambda: True) -> None:
        self.tallies: dict[tuple[str, str], ModeTally] = {}
        self.watching: list[_Watching] = []
        self._patches = Patches()
        self._cancels: list[Callable[[], None]] = []
        self._is_active = is_active
        self._modules: dict[int, tuple[Callable[[], Any], list[_Watching]]] = {}
        self._hook: Any = None
        self._unquiet: Callable[[], None] = lambda: None  # torch's warning about our hook

    # ---- lifetime ------------------------------------------------------------------------
    def install(self) -> ModeWatch:
        import torch

        self._wrap_save(torch, "save", lambda args, kwargs: args[0] if args else kwargs.get("obj"))
        self._cancels.append(when_imported("safetensors.torch", self._wrap_safetensors))
        return self

    def remove(self) -> None:
        for cancel in self._cancels:
            cancel()
        self._cancels.clear()
        self._patches.undo()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            self._unquiet()

    def findings(self) -> tuple[Finding, ...]:
        return mode_findings(self.tallies)

    # ---- OptimizerWatch's events ---------------------------------------------------------
    def adopt(self, entry: Watched, optimizer: Any, frame: FrameType | None) -> None:
        if train_mode_of(optimizer) is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        watching = _Watching(
            label=entry.label,
            ref=weakref.ref(optimizer),
            entry=entry,
            storages={s for s in (_storage(p) for p in params) if s is not None},
        )
        modules = list(_holders(params, frame))[:MAX_HOOKED]
        watching.has_batchnorm = _has_batchnorm(modules)
        for module in modules:
            _, held = self._modules.setdefault(id(module), (weakref.ref(module), []))
            held.append(watching)
        self.watching.append(watching)
        if self._hook is None:
            import torch.nn.modules.module as torch_module

            from sfdiag.step_audit.compiling import outside_graphs, quiet_about_our_hook

            self._unquiet = quiet_about_our_hook()
            self._hook = torch_module.register_module_forward_pre_hook(
                outside_graphs(self._forward)
            )

    def before(self, entry: Watched, optimizer: Any) -> None:
        watching = self._of(entry)
        if watching is not None:
            watching.stepping_in_eval = train_mode_of(optimizer) is False

    def after(self, entry: Watched, optimizer: Any) -> None:
        watching = self._of(entry)
        if watching is not None and watching.stepping_in_eval:
            self._tally(watching, "step-in-eval-mode", watching.step)
            watching.stepping_in_eval = False

    # ---- forwards ------------------------------------------------------------------------
    def _forward(self, module: Any, args: Any) -> None:
        """torch's global forward pre-hook: a dict lookup for a module no schedule-free
        optimizer holds; for one that does, a flag read or two. Global, so nothing is stored
        on the user's modules (torch.save(model), copy.deepcopy and torch.jit see none)."""
        held = self._modules.get(id(module))
        if held is None or held[0]() is not module or not self._is_active():
            return
        import torch

        grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        for watching in held[1]:
            optimizer = watching.ref()
            step = watching.step
            if optimizer is None or step < 0:
                continue  # no step yet: x == y
            mode = train_mode_of(optimizer)
            if mode and (not module.training or not grad):
                self._eval_in_train_mode(watching, optimizer)
            elif mode is False and module.training and not grad:
                watching.refreshed_at = step  # BatchNorm statistics gathered at x
            stale = watching.refreshed_at < step
            if watching.has_batchnorm and not module.training and stale:
                if step not in watching.stale_steps:  # once per evaluation, not per batch
                    watching.stale_steps.add(step)
                    self._tally(watching, "batchnorm-stats", step)

    def _eval_in_train_mode(self, watching: _Watching, optimizer: Any) -> None:
        step = watching.step
        if step in watching.evaluated_steps:
            return  # one evaluation per step, however many batches and modules it runs
        watching.evaluated_steps.add(step)
        measured = None
        if len(watching.evaluated_steps) <= MAX_GAP_READS:
            try:
                measured = gap(optimizer)
            except Exception:
                measured = None
        self._tally(watching, "eval-in-train-mode", step, measured)

    # ---- checkpoints ---------------------------------------------------------------------
    def _wrap_save(self, owner: Any, name: str, saved: Callable[[tuple, dict], Any]) -> None:
        from sfdiag.run.taps._hooks import guarded

        original = getattr(owner, name, None)
        if original is None or getattr(original, "_sfdiag_tap", False):
            return

        def save(*args: Any, **kwargs: Any) -> Any:
            try:
                self._check_saved(saved(args, kwargs))
            except Exception:  # never break a checkpoint
                pass
            return original(*args, **kwargs)

        self._patches.set(owner, name, guarded(original, save, self._is_active))

    def _wrap_safetensors(self, module: Any) -> None:
        for name in ("save_file", "save"):
            self._wrap_save(module, name, lambda a, k: a[0] if a else k.get("tensors"))

    def _check_saved(self, obj: Any) -> None:
        training = [w for w in self.watching if train_mode_of(w.ref()) is True]
        if not training:
            return
        found = set(_storages_in(obj))
        for watching in training:
            if found & watching.storages:
                self._tally(watching, "checkpoint-in-train-mode", watching.step)

    # ---- bookkeeping ---------------------------------------------------------------------
    def _of(self, entry: Watched) -> _Watching | None:
        for watching in self.watching:
            if watching.entry is entry:
                return watching
        return None

    def _tally(self, watching: _Watching, kind: str, step: int, gap: float | None = None) -> None:
        self.tallies.setdefault((watching.label, kind), ModeTally()).add(step, gap)


def _holders(params: list[Any], frame: FrameType | None) -> Iterator[Any]:
    """The modules near the training code that hold any of ``params`` (the model, a wrapper
    of it, a LightningModule...), and their children that hold parameters (a
    LightningModule's validation_step calls ``self.net``, not its own forward)."""
    from sfdiag.run.param_names import _modules_near

    wanted = {id(p) for p in params}
    seen: set[int] = set()
    roots = []
    for module in _modules_near(frame):
        if id(module) in seen:
            continue
        seen.add(id(module))
        if any(id(p) in wanted for p in module.parameters()):
            roots.append(module)
    chosen: dict[int, Any] = {}
    for root in roots:
        chosen.setdefault(id(root), root)
    for root in roots:
        for child in root.children():
            if any(id(p) in wanted for p in child.parameters()):
                chosen.setdefault(id(child), child)
    yield from chosen.values()


def _storages_in(obj: Any) -> Iterator[int]:
    """The storages of every tensor ``obj`` holds: directly, in containers, or as a
    module's parameters and buffers (bounded: depth and items)."""
    import torch

    stack: list[tuple[Any, int]] = [(obj, 0)]
    items = 0
    while stack and items < _MAX_ITEMS:
        value, depth = stack.pop()
        items += 1
        if isinstance(value, torch.Tensor):
            storage = _storage(value)
            if storage is not None:
                yield storage
        elif isinstance(value, torch.nn.Module):
            for tensor in value.state_dict().values():
                storage = _storage(tensor)
                if storage is not None:
                    yield storage
        elif depth < _MAX_DEPTH:
            if isinstance(value, dict):
                stack.extend((v, depth + 1) for v in value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend((v, depth + 1) for v in value)
