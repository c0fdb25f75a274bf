"""Config -> the objects a probe runs: every name and import path resolved up front.

Anything wrong here is the user's input, so it raises SfdiagError before a single
probe runs. What can only fail while running (an optimizer that rejects the
model) is left to the probe, which turns it into an error row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sfdiag.errors import SfdiagError, shown
from sfdiag.probe import data as data_module
from sfdiag.probe import losses, registry
from sfdiag.probe.config import Config, OptimizerSpec

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BuiltOptimizer:
    spec: OptimizerSpec
    factory: Callable[..., Any]  # the optimizer class (or any callable(params, **kwargs))
    cls_name: str  # "module:Class", as shown in every output


@dataclass(frozen=True)
class BuiltProbe:
    config: Config
    device: torch.device
    dtype: torch.dtype
    model_factory: Callable[[], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    optimizers: tuple[BuiltOptimizer, ...]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SfdiagError("device: 'cuda' was asked for, but torch sees no CUDA device here")
    return torch.device(name)


# What sfdiag passes a data factory by name, and the config key that sets it.
_DATA_ARGUMENTS = {
    "batch_size": "data.batch_size",
    "steps": "steps",
    "seed": "seed",
    "loss": "loss",
}
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _check_kwargs(
    target: Callable[..., Any],
    kwargs: dict[str, Any],
    where: str,
    *,
    supplied: dict[str, str] | None = None,
    positional: int = 0,
) -> None:
    """Unknown keyword arguments are config errors, named, before anything runs.

    sfdiag itself passes the ``supplied`` arguments (name -> the config key that sets them)
    and the first ``positional`` parameters (the data factory's model): naming one of those
    in kwargs is an error too, and they are not offered as alternatives.
    """
    supplied = supplied or {}
    for key in kwargs:
        if key in supplied:
            raise SfdiagError(
                f"{where}: {shown(key)} is passed by sfdiag; set it with `{supplied[key]}:`"
            )
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call itself complain
    parameters = signature.parameters.values()
    leading = [p.name for p in parameters if p.kind in _POSITIONAL][:positional]
    for key in kwargs:
        if key in leading:
            raise SfdiagError(f"{where}: {shown(key)} is passed by sfdiag")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in kwargs:
        if key not in accepted:
            passed = ("self", "params", *supplied, *leading)
            options = [a for a in accepted if a not in passed]
            raise SfdiagError(
                f"{where}: unknown argument {shown(key)}{registry.did_you_mean(key, options)}; "
                f"accepted: {', '.join(options) or 'none'}"
            )


def _takes_params(target: Callable[..., Any]) -> bool:
    """Whether ``target(params, ...)`` binds; True when there is no signature to tell."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind_partial(None)
    except TypeError:
        return False
    return True


def _class_name(spec_cls: str) -> str:
    return registry.target_of("optimizer", spec_cls)


def resolve_optimizer(spec: OptimizerSpec, index: int) -> BuiltOptimizer:
    where = f"optimizers[{index}] ({spec.name})"
    factory = registry.load("optimizer", spec.cls, f"{where}.class")
    if not callable(factory):
        raise SfdiagError(f"{where}.class: {shown(spec.cls)} is not an optimizer class or factory")
    if inspect.isclass(factory) and not issubclass(factory, torch.optim.Optimizer):
        if not hasattr(factory, "step"):
            raise SfdiagError(
                f"{where}.class: {shown(spec.cls)} is not an optimizer class (no step() method)"
            )
    _check_kwargs(factory, spec.kwargs, f"{where}.kwargs")
    if not _takes_params(factory):
        raise SfdiagError(
            f"{where}.class: {shown(spec.cls)} is not an optimizer class or factory "
            "(it cannot be called with the model's parameters)"
        )
    return BuiltOptimizer(spec, factory, _class_name(spec.cls))


def _model_factory(config: Config, dtype: torch.dtype) -> Callable[[], nn.Module]:
    where = "model.name"
    factory = registry.load("model", config.model.name, where)
    if not callable(factory):
        raise SfdiagError(f"{where}: {shown(config.model.name)} is not callable")
    _check_kwargs(factory, config.model.kwargs, "model.kwargs")

    def build() -> nn.Module:
        torch.manual_seed(config.seed)
        model = factory(**config.model.kwargs)
        if not isinstance(model, nn.Module):
            raise SfdiagError(
                f"{where}: {shown(config.model.name)} returned {type(model).__name__}, "
                "not a torch.nn.Module"
            )
        if next(model.parameters(), None) is None:
            raise SfdiagError(
                f"{where}: {shown(config.model.name)} built a {type(model).__name__} without "
                "parameters: there is nothing to optimize"
            )
        return model.to(dtype=dtype)

    return build


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except SfdiagError:
        raise
    except Exception as exc:
        raise SfdiagError(f"{what} raised {type(exc).__name__}: {exc}") from exc


def build(config: Config) -> BuiltProbe:
    """Resolve every name, build one model to shape the data, generate the batches."""
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    optimizers = tuple(resolve_optimizer(spec, i) for i, spec in enumerate(config.optimizers))
    model_factory = _model_factory(config, dtype)
    model = _call(f"model {shown(config.model.name)}", model_factory)

    loss_name = config.loss
    if loss_name == "auto":
        spec = data_module.infer_input_spec(model)
        sample = data_module.synthetic_inputs(spec, 2, 1, torch.Generator().manual_seed(0))[0]
        if sample.is_floating_point():  # token ids stay integers
            sample = sample.to(dtype)
        loss_name = losses.auto(model, data_module.output_shape(model, sample))
    loss_fn = registry.load("loss", loss_name, "loss")
    if not callable(loss_fn):
        raise SfdiagError(f"loss: {shown(loss_name)} is not callable")

    data_fn = registry.load("data", config.data.name, "data.name")
    if not callable(data_fn):
        raise SfdiagError(f"data.name: {shown(config.data.name)} is not callable")
    _check_kwargs(
        data_fn, config.data.kwargs, "data.kwargs", supplied=_DATA_ARGUMENTS, positional=1
    )
    batches = _call(
        f"data {shown(config.data.name)}",
        data_fn,
        model,
        batch_size=config.data.batch_size,
        steps=config.steps,
        seed=config.seed,
        loss=loss_name,
        **config.data.kwargs,
    )
    batches = _as_batches(batches, config.steps, dtype)
    return BuiltProbe(config, device, dtype, model_factory, loss_fn, batches, optimizers)


def _as_batches(batches: Any, steps: int, dtype: torch.dtype) -> list[tuple[Any, Any]]:
    out = []
    for i, item in enumerate(batches):
        if i == steps:
            break
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise SfdiagError(f"data: batch {i} is not an (input, target) pair")
        x, y = item
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.to(dtype)
        if isinstance(y, torch.Tensor) and y.is_floating_point():
            y = y.to(dtype)
        out.append((x, y))
    if len(out) < steps:
        raise SfdiagError(f"data: gave {len(out)} batches, the probe needs steps={steps}")
    return out
