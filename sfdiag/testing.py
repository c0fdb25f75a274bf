"""Helpers for your own test suite: does ``step()`` leave ``p.grad`` alone?

::

    from sfdiag.testing import assert_step_preserves_grads

    def test_my_optimizer_keeps_grads():
        assert_step_preserves_grads(lambda params: MyOptimizer(params, lr=1e-3))

A few real steps on a small model (a tiny MLP unless you pass ``model_factory``), with
every grad fingerprinted just before and just after ``step()``. Any object with ``step()``
works: a torch optimizer is audited through its step hooks, anything else by snapshots
taken around the call; an optimizer whose ``step()`` requires a closure (LBFGS) gets one.
No pytest import: the failure is a plain ``AssertionError`` naming the verdict, the kind
of change and the parameters. Exceptions from your optimizer or model propagate
unchanged; sfdiag's own are ``sfdiag.step_audit.auditor.AuditError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sfdiag.results import OptimizerResult, StepRecord
from sfdiag.step_audit import verdict
from sfdiag.step_audit.auditor import StepAuditor, StepWatch, class_path

__all__ = ["assert_step_preserves_grads", "check_step", "tiny_mlp"]

_BATCH = 16


def tiny_mlp() -> torch.nn.Module:
    """8 -> 16 -> 4, tanh: every kind of parameter (weights, biases) in a few hundred elements."""
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _default_loss(output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"the model returned {type(output).__name__}, not a tensor: pass loss_fn= "
            "(a callable taking the model's output and returning a scalar loss)"
        )
    return output.float().pow(2).mean()


def _lazy(module: torch.nn.Module) -> bool:
    """A lazy layer (LazyLinear, LazyConv2d...) whose input size no first forward has set."""
    return isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and bool(
        module.has_uninitialized_params()
    )


def _default_inputs(model: torch.nn.Module) -> torch.Tensor:
    """A random batch for the model's first nn.Linear, unless a lazy layer comes first."""
    for name, module in model.named_modules():
        if _lazy(module):
            raise ValueError(
                f"cannot infer an input for this model: its layer {name or 'model'} "
                f"({type(module).__name__}) is lazy, so its input shape is only set by a "
                "first forward pass: pass inputs= (a batch the model takes, e.g. "
                "inputs=torch.randn(16, 3, 32, 32))"
            )
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            return torch.randn(_BATCH, module.in_features, device=weight.device, dtype=weight.dtype)
    raise ValueError("cannot guess an input for this model (it has no nn.Linear): pass inputs=")


def _requires_closure(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` takes a ``closure`` it cannot do without (LBFGS)."""
    try:
        parameter = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def check_step(
    optimizer_factory: Callable[..., Any],
    model_factory: Callable[[], torch.nn.Module] | None = None,
    *,
    steps: int = 3,
    seed: int = 0,
    inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    closure: bool | None = None,
) -> OptimizerResult:
    """Run ``steps`` audited steps and return the result (verdict, fingerprint, per param).

    ``optimizer_factory(params)`` builds the optimizer (an optimizer class works): a
    torch optimizer, or any object with ``step()`` (``zero_grad()`` is used where it has
    one); schedule-free optimizers are put in train mode. ``inputs`` is the model's input
    (a tuple is unpacked as positional arguments); by default a random batch sized to the
    model's first ``nn.Linear`` (a model whose first layer is lazy needs ``inputs``).
    ``loss_fn(output)`` gives the loss; by default the mean square of the output.
    ``closure``: call ``step(closure)``, the closure recomputing the loss and grads; by
    default where ``step`` requires one (LBFGS). The global CPU RNG state is left as it was.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (model_factory or tiny_mlp)()
        model.train()
        args = _as_args(inputs if inputs is not None else _default_inputs(model))
        loss_of = loss_fn or _default_loss
        optimizer = optimizer_factory(model.parameters())
        train = getattr(optimizer, "train", None)
        if callable(train):
            train()
        auditor = StepAuditor(names={id(p): n for n, p in model.named_parameters()})
        watch = StepWatch.start(auditor, optimizer, list(model.parameters()))
        if closure is None:
            closure = _requires_closure(optimizer)
        records: list[StepRecord] = []
        try:
            for index in range(steps):
                watch.zero_grad(set_to_none=True)
                loss = loss_of(model(*args))
                loss.backward()
                step_args: tuple = ()
                if closure:

                    def recompute() -> torch.Tensor:
                        with torch.enable_grad():
                            watch.zero_grad(set_to_none=False)
                            again = loss_of(model(*args))
                            again.backward()
                        watch.retake()  # the grads step() sees are these
                        return again

                    step_args = (recompute,)
                with np.errstate(all="ignore"):  # the post-step fits, not your code
                    watch.before_step()
                    optimizer.step(*step_args)
                    observed = watch.after_step()
                records.append(
                    StepRecord(
                        index,
                        float(loss.detach()),
                        observed.pre_norm,
                        observed.post_norm,
                        observed.params_mutated,
                    )
                )
        finally:
            watch.detach()
    observations = auditor.observations
    return verdict.summarize(
        type(optimizer).__name__,
        class_path(optimizer),
        records,
        [o.params for o in observations],
        nan_only=bool(observations) and all(o.nan_only for o in observations),
    )


def _as_args(inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[Any, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def failure_message(result: OptimizerResult) -> str:
    """Why ``result`` fails ``assert_step_preserves_grads``: several lines, no colour."""
    if result.undetermined:
        return (
            f"{result.optimizer} ({result.cls}): could not tell whether step() leaves p.grad "
            f"alone: {result.advice}"
        )
    kind = f", fingerprint {result.fingerprint}" if result.fingerprint else ""
    lines = [
        f"{result.optimizer} ({result.cls}) did not leave p.grad alone during step(): "
        f"verdict {result.verdict}{kind}",
        f"  global grad norm before step() {result.pre_step_grad_norm:.6g}, after "
        f"{result.post_step_grad_norm:.6g} (median over {len(result.steps)} steps)",
        f"  {result.params_mutated} of {result.params_with_grad} params affected:",
    ]
    for p in result.params:
        if p.verdict == "clean":
            continue
        how = f"{p.verdict}, {p.fingerprint}" if p.fingerprint else p.verdict
        lines.append(
            f"    {p.name} {tuple(p.shape)}: {how}; norm {p.pre_step_grad_norm:.6g} -> "
            f"{p.post_step_grad_norm:.6g}"
        )
    if result.advice:
        lines.append(f"  advice: {result.advice}")
    return "\n".join(lines)


def assert_step_preserves_grads(
    optimizer_factory: Callable[..., Any],
    model_factory: Callable[[], torch.nn.Module] | None = None,
    *,
    steps: int = 3,
    seed: int = 0,
    inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    closure: bool | None = None,
) -> OptimizerResult:
    """Raise AssertionError if any step mutated, replaced or cleared any ``p.grad``, or
    if the check could not tell (the grads held nothing but NaN at every step).

    Arguments as for ``check_step``; returns its (clean) result when the check passes.
    """
    result = check_step(
        optimizer_factory,
        model_factory,
        steps=steps,
        seed=seed,
        inputs=inputs,
        loss_fn=loss_fn,
        closure=closure,
    )
    if result.flagged or result.undetermined:
        raise AssertionError(failure_message(result))
    return result
