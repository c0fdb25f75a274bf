"""Small model factories with hostile numbers (and one hostile optimizer), by import path.

``model: {name: "hostile_models:nan_model"}``: each factory returns a fresh ``nn.Module``
that ``data: auto`` and ``loss: auto`` can feed (a first ``nn.Linear`` or embedding, or a
declared ``sfdiag_input_shape``). The probe builds every model from the config's seed, so
factories draw no randomness of their own beyond their layers' initialisation.
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn
from torch.nn import functional as F

IN, HIDDEN, CLASSES = 8, 16, 4


class _Small(nn.Module):
    """8 -> 16 -> 4 classifier; ``scale`` multiplies the output (NaN, Inf, 0 ...)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)
        self.scale = scale
        self.sfdiag_input_shape = (IN,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))) * self.scale


def small() -> nn.Module:
    return _Small()


def nan_model() -> nn.Module:
    """Output times NaN: a NaN loss and all-NaN grads at every step."""
    return _Small(math.nan)


def inf_model() -> nn.Module:
    """Output times Inf: an infinite / NaN loss and non-finite grads."""
    return _Small(math.inf)


def zero_model() -> nn.Module:
    """Output times 0: a constant loss and grads that are exactly zero."""
    return _Small(0.0)


def nan_grad_model() -> nn.Module:
    """A finite loss, but a backward hook puts NaN and Inf into a few grad elements of fc1."""
    model = _Small()

    def poison(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[0] = math.nan
        grad.view(-1)[1] = math.inf
        grad.view(-1)[2] = -math.inf
        return grad

    model.fc1.weight.register_hook(poison)
    return model


def frozen_model() -> nn.Module:
    """The first layer has requires_grad False: its params never get a grad."""
    model = _Small()
    model.fc1.requires_grad_(False)
    return model


class _Unused(_Small):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(IN, CLASSES)  # trainable, never in the graph: grad stays None


def unused_param_model() -> nn.Module:
    return _Unused()


def all_frozen_model() -> nn.Module:
    """No parameter requires grad: backward() itself fails, for every optimizer."""
    return _Small().requires_grad_(False)


class _Dropout(_Small):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.drop(x))


def dropout_model() -> nn.Module:
    """Draws from torch's global RNG in every training forward (a determinism check)."""
    return _Dropout()


class _SparseBag(nn.Module):
    """A bag-of-tokens classifier with sparse grads (``data: auto`` feeds token ids)."""

    def __init__(self, vocab: int = 50, head: bool = False):
        super().__init__()
        dim = HIDDEN if head else CLASSES
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean", sparse=True)
        self.head = nn.Linear(dim, CLASSES) if head else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.bag(tokens)
        return out if self.head is None else self.head(out)


def sparse_bag(vocab: int = 50, head: bool = False) -> nn.Module:
    """Only an EmbeddingBag(sparse=True) (SparseAdam's case), or with a dense head."""
    return _SparseBag(vocab, head)


class _Slow(_Small):
    """Sleeps in forward; after each forward, touches the file named in $SFDIAG_TEST_MARKER."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        marker = os.environ.get("SFDIAG_TEST_MARKER")
        if marker and self.training:
            with open(marker, "a") as handle:
                handle.write(".")
        return super().forward(x)


def slow_model(delay: float = 0.05) -> nn.Module:
    return _Slow(delay)


def per_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss that forgot to reduce: one value per sample, not a scalar."""
    return F.cross_entropy(output, target, reduction="none")


class _BrokenInTraining(_Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise ValueError("this model's training forward is broken")
        return super().forward(x)


def broken_in_training_model() -> nn.Module:
    """Evaluates (so sfdiag's shape check passes), but its training forward raises: the
    model's failure, whatever the optimizer."""
    return _BrokenInTraining()


def lazy_first_model(declare: bool = False) -> nn.Module:
    """A LazyLinear first: its input size is unknown until a first forward, unless the
    model declares ``sfdiag_input_shape`` (``declare=True``)."""
    model = nn.Sequential(nn.LazyLinear(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    if declare:
        model.sfdiag_input_shape = (IN,)
    return model


def lazy_last_model() -> nn.Module:
    """A convolution first (its input shape inferable), a LazyLinear last."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, stride=4), nn.Flatten(), nn.LazyLinear(CLASSES))


class InterruptOnStep(torch.optim.SGD):
    """An optimizer whose ``step()`` raises KeyboardInterrupt (Ctrl-C) at step ``at``."""

    def __init__(self, params, lr: float = 0.01, at: int = 1):
        super().__init__(params, lr=lr)
        self.at, self.count = at, 0

    @torch.no_grad()
    def step(self, closure=None):
        if self.count == self.at:
            raise KeyboardInterrupt
        self.count += 1
        return super().step(closure)
