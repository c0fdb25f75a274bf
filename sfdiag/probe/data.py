"""Seeded synthetic data, generated on the CPU with its own generator.

Every data factory is called as
``factory(model, batch_size=B, steps=N, seed=S, loss=LOSS, **kwargs)`` and returns
a list of ``(input, target)`` pairs, one per step. ``loss`` is the resolved loss
name (or import path), so targets can be class indices or real values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from sfdiag.errors import SfdiagError, shown
from sfdiag.probe.losses import CLASS_TARGET_LOSSES

Batches = list[tuple[torch.Tensor, torch.Tensor]]

# Spatial sizes used when a model's first layer says how many channels it takes but not
# how large an image is.
_CONV_SIZES = {nn.Conv1d: (32,), nn.Conv2d: (28, 28), nn.Conv3d: (8, 8, 8)}
_TOKENS_PER_SAMPLE = 8


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]  # one sample
    vocab: int | None = None  # integer token ids in [0, vocab) instead of N(0, 1) floats


def infer_input_spec(model: nn.Module) -> InputSpec:
    """What one sample fed to ``model`` looks like, from its declaration or first layer."""
    declared = getattr(model, "sfdiag_input_shape", None)
    if declared is not None:
        return InputSpec(tuple(int(d) for d in declared))
    for name, module in model.named_modules():
        # a lazy layer (LazyLinear, LazyConv2d: subclasses of the layers below) reads 0
        # input features until a first forward sets them
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise SfdiagError(
                f"data: auto cannot infer the input shape of {type(model).__name__}: its "
                f"layer {name or 'model'} ({type(module).__name__}) is lazy, so its input "
                "shape is only set by a first forward pass; give the model a "
                "'sfdiag_input_shape' attribute (one sample's shape, e.g. (3, 32, 32)) or "
                "name a data factory"
            )
        if isinstance(module, nn.Linear):
            return InputSpec((module.in_features,))
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return InputSpec((_TOKENS_PER_SAMPLE,), vocab=module.num_embeddings)
        for conv, size in _CONV_SIZES.items():
            if isinstance(module, conv):
                return InputSpec((module.in_channels, *size))
    raise SfdiagError(
        f"data: auto cannot tell what input {type(model).__name__} takes: give the model a "
        "'sfdiag_input_shape' attribute (one sample's shape) or name a data factory"
    )


def synthetic_inputs(spec: InputSpec, batch_size: int, steps: int, gen: torch.Generator) -> list:
    shape = (batch_size, *spec.shape)
    if spec.vocab is not None:
        return [torch.randint(0, spec.vocab, shape, generator=gen) for _ in range(steps)]
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def output_shape(model: nn.Module, sample: torch.Tensor) -> tuple[int, ...]:
    # eval() so that the shape probe draws no dropout randomness; the mode is restored.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return tuple(model(sample).shape)
    except Exception as exc:
        raise SfdiagError(
            f"data: the model rejected a synthetic batch of shape {tuple(sample.shape)}: "
            f"{type(exc).__name__}: {exc}; name a data factory that fits it"
        ) from exc
    finally:
        model.train(was_training)


def _targets(
    out_shape: tuple[int, ...], loss: str, steps: int, gen: torch.Generator
) -> list[torch.Tensor]:
    if loss in CLASS_TARGET_LOSSES:
        if len(out_shape) < 2:
            raise SfdiagError(
                f"loss: {loss} needs class scores of shape (batch, classes), the model "
                f"gives {out_shape}"
            )
        target_shape = (out_shape[0], *out_shape[2:])
        return [torch.randint(0, out_shape[1], target_shape, generator=gen) for _ in range(steps)]
    return [torch.randn(out_shape, generator=gen) for _ in range(steps)]


def gaussian(
    model: nn.Module,
    *,
    batch_size: int,
    steps: int,
    seed: int,
    loss: str,
    input_shape: Sequence[int] | None = None,
) -> Batches:
    """N(0, 1) inputs of the model's input shape (or ``input_shape``, one sample's);
    class-index or N(0, 1) targets."""
    spec = infer_input_spec(model) if input_shape is None else _input_shape(input_shape)
    gen = torch.Generator().manual_seed(seed)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    inputs = [
        x.to(dtype) if x.is_floating_point() else x
        for x in synthetic_inputs(spec, batch_size, steps, gen)
    ]
    out_shape = output_shape(model, inputs[0])
    return list(zip(inputs, _targets(out_shape, loss, steps, gen), strict=True))


def gaussian_regression(
    model: nn.Module,
    *,
    batch_size: int,
    steps: int,
    seed: int,
    loss: str,
    input_shape: Sequence[int] | None = None,
) -> Batches:
    """N(0, 1) inputs and N(0, 1) targets, whatever the loss."""
    return gaussian(
        model, batch_size=batch_size, steps=steps, seed=seed, loss="mse", input_shape=input_shape
    )


def _input_shape(value: Any) -> InputSpec:
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in value)
    ):
        raise SfdiagError(
            f"data.kwargs.input_shape: must be a list of sizes >= 1 (one sample's shape, e.g. "
            f"[3, 32, 32]), got {shown(value)}"
        )
    return InputSpec(tuple(value))


#: ``data: auto`` is the gaussian generator matched to the model and loss.
auto = gaussian
