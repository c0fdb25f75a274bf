"""Purpose-built optimizers that change p.grad in each way sfdiag must recognise.

Each wraps plain SGD; the mutation happens inside step(), after the step pre-hook.
Tests name them by import path ("mutators:ScaleGrads"), like a user's own optimizer.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class _Mutating(torch.optim.SGD):
    def __init__(self, params, lr: float = 0.01, **kwargs):
        super().__init__(params, lr=lr, **kwargs)

    def mutate(self, p: torch.Tensor) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.mutate(p)
        return loss


class Clean(_Mutating):
    def mutate(self, p):
        pass


class ScaleGrads(_Mutating):
    """Clipping-like: every grad multiplied by 0.5 in place."""

    def mutate(self, p):
        p.grad.mul_(0.5)


class ScaleGradsViaData(_Mutating):
    """The same through .data, which the version counter does not see."""

    def mutate(self, p):
        p.grad.data.mul_(0.5)


class FoldWeightDecay(torch.optim.SGD):
    """Adds wd * param to the grad in place before stepping (as coupled weight decay does)."""

    def __init__(self, params, lr: float = 0.01, wd: float = 0.01):
        super().__init__(params, lr=lr)
        self.wd = wd

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.add_(p, alpha=self.wd)
        return super().step(closure)


class SignGrads(_Mutating):
    def mutate(self, p):
        p.grad.sign_()


class ZeroGrads(_Mutating):
    def mutate(self, p):
        p.grad.zero_()


class NoiseGrads(_Mutating):
    def mutate(self, p):
        p.grad.add_(torch.randn_like(p.grad))


class ReplaceGrads(_Mutating):
    def mutate(self, p):
        p.grad = p.grad.clone()


class ClearGrads(_Mutating):
    def mutate(self, p):
        p.grad = None


class AdamNormalize(torch.optim.Optimizer):
    """A tiny Adam that, like sf-adamw, divides p.grad by its denominator in place."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                v = state["exp_avg_sq"].view_as(p)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (v / (1 - beta2 ** state["step"])).sqrt_().add_(self.eps_of(group, p))
                p.grad.div_(denom)
                p.add_(p.grad, alpha=-group["lr"])

    def eps_of(self, group, p) -> float:
        """What the denominator adds."""
        return group["eps"]


class OddStates(AdamNormalize):
    """AdamNormalize whose params' states are not all alike: the third param keeps its
    second moment flat (its own fits find none of its shape), and every param keeps a
    signed ``trace`` (never a second moment), the fifth's flat."""

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        for k, p in enumerate(params):
            if p.grad is not None and not self.state[p]:
                self.state[p]["step"] = 0
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p).view(-1 if k == 2 else p.shape)
        super().step(closure)
        for k, p in enumerate(params):
            if p.grad is not None:
                self.state[p]["trace"] = -p.detach().abs().reshape(-1 if k == 4 else p.shape)


class FailsToStep(_Mutating):
    def mutate(self, p):
        raise RuntimeError("this optimizer cannot step")


class FailsToConstruct(torch.optim.SGD):
    def __init__(self, params, lr: float = 0.01):
        raise ValueError("needs a closure-capable model")


class DuckTyped:
    """Not a torch.optim.Optimizer: no step hooks, just step() (and zero_grad())."""

    def __init__(self, params, lr: float = 0.01, scale: float = 1.0):
        self.params = list(params)
        self.lr, self.scale = lr, scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        for p in self.params:
            if p.grad is not None:
                if self.scale != 1.0:
                    p.grad.mul_(self.scale)
                p.sub_(p.grad, alpha=self.lr)


class LenientScheduleFree(__import__("sfdiag.optim", fromlist=["x"]).AdamWScheduleFreeReference):
    """Schedule-free AdamW (reference form) whose step() does not refuse eval mode, as some
    schedule-free implementations do not: stepping at x goes unnoticed by the optimizer."""

    def _require_train_mode(self) -> None:
        pass


class NoSuperInit(torch.optim.Optimizer):
    """Lookahead as timm writes it: wraps a base optimizer and never calls
    ``Optimizer.__init__`` (so it has no step-hook dicts, and torch never wraps its step());
    ``zero_grad`` delegates to the base. ``base="adam"`` steps with AdamNormalize, which
    divides p.grad in place."""

    def __init__(self, params, lr: float = 0.01, alpha: float = 0.5, k: int = 2, base="sgd"):
        # NOTE: super().__init__() not called on purpose, as timm's Lookahead does
        bases = {"sgd": torch.optim.SGD, "adam": AdamNormalize}
        self._base = bases[base](params, lr=lr)
        self.param_groups = self._base.param_groups
        self.defaults = self._base.defaults
        self.state = defaultdict(dict)
        self.alpha, self.k, self.count = alpha, k, 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._base.step(closure)
        self.count += 1
        if self.count % self.k == 0:  # pull the fast weights toward the slow ones
            for group in self.param_groups:
                for p in group["params"]:
                    slow = self.state[p].setdefault("slow", p.detach().clone())
                    slow.add_(p - slow, alpha=self.alpha)
                    p.copy_(slow)
        return loss


class NoSuperInitInheritedZeroGrad(NoSuperInit):
    """The same without a zero_grad of its own: torch's, on an Optimizer never initialised,
    would wrap the class's step() in the hook-firing wrapper, and every step() would fail."""

    zero_grad = torch.optim.Optimizer.zero_grad


class TupleEps(AdamNormalize):
    """AdamNormalize with Adafactor-style ``eps=(None, 1e-3)``: None stands for the dtype's
    machine epsilon, which is what it adds to the denominator."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps=(None, 1e-3)):
        torch.optim.Optimizer.__init__(self, params, dict(lr=lr, betas=betas, eps=eps))

    def eps_of(self, group, p) -> float:
        eps = group["eps"][0]
        return torch.finfo(p.dtype).eps if eps is None else eps


class StepOnly:
    """Not a torch optimizer and no zero_grad(): step() is all an optimizer must have."""

    def __init__(self, params, lr: float = 0.01, scale: float = 1.0):
        self.params = list(params)
        self.lr, self.scale = lr, scale

    @torch.no_grad()
    def step(self, closure=None):
        for p in self.params:
            if p.grad is not None:
                if self.scale != 1.0:
                    p.grad.mul_(self.scale)
                p.sub_(p.grad, alpha=self.lr)
