"""The registries: one table each, keyed by the name users type.

Entries name their target as an import path ("module:attribute") so that
reading the tables (for ``sfdiag list``, config validation, "did you mean"
hints) never imports torch. ``load`` resolves a registry name or a user's own
import path to the object.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sfdiag.errors import SfdiagError, shown


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "package.module:attribute"
    summary: str


def _table(*entries: Entry) -> dict[str, Entry]:
    return {entry.name: entry for entry in entries}


OPTIMIZERS = _table(
    Entry("adamw", "torch.optim:AdamW", "torch's AdamW; never writes to p.grad"),
    Entry(
        "sf-adamw",
        "sfdiag.optim:AdamWScheduleFree",
        "schedule-free AdamW, memory-efficient: divides p.grad in place by its Adam denominator",
    ),
    Entry(
        "sf-ref",
        "sfdiag.optim:AdamWScheduleFreeReference",
        "schedule-free AdamW, reference form: keeps x, y, z explicitly, p.grad untouched",
    ),
    Entry(
        "sf-sgd",
        "sfdiag.optim:SGDScheduleFree",
        "schedule-free SGD: folds weight decay into p.grad in place when weight_decay > 0",
    ),
    Entry(
        "sf-sgd-ref",
        "sfdiag.optim:SGDScheduleFreeReference",
        "schedule-free SGD, reference form: p.grad untouched",
    ),
)

MODELS = _table(
    Entry("mlp", "sfdiag.probe.models:mlp", "2-layer MLP, 64 -> 128 -> 10 (default; fast)"),
    Entry(
        "mnist-cnn",
        "sfdiag.probe.models:mnist_cnn",
        "the PyTorch MNIST example CNN, 1.2M parameters, 1x28x28 inputs",
    ),
)

DATASETS = _table(
    Entry(
        "auto", "sfdiag.probe.data:auto", "synthetic data matched to the model's input and output"
    ),
    Entry(
        "gaussian", "sfdiag.probe.data:gaussian", "seeded N(0, 1) inputs with random class labels"
    ),
    Entry(
        "gaussian-regression", "sfdiag.probe.data:gaussian_regression", "N(0, 1) inputs and targets"
    ),
)

LOSSES = _table(
    Entry("auto", "sfdiag.probe.losses:auto", "cross_entropy for classifiers, mse otherwise"),
    Entry(
        "cross_entropy", "sfdiag.probe.losses:cross_entropy", "torch.nn.functional.cross_entropy"
    ),
    Entry("nll", "sfdiag.probe.losses:nll", "torch.nn.functional.nll_loss (log-softmax outputs)"),
    Entry("mse", "sfdiag.probe.losses:mse", "torch.nn.functional.mse_loss"),
)

REGISTRIES: dict[str, dict[str, Entry]] = {
    "optimizer": OPTIMIZERS,
    "model": MODELS,
    "data": DATASETS,
    "loss": LOSSES,
}


def is_import_path(name: str) -> bool:
    """Import paths are "pkg.mod:attr"; registry names never hold a colon."""
    return ":" in name


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A " (did you mean 'x'?)" suffix, or "" when nothing is close; case does not count
    (``JSON`` -> 'json', ``AdamW`` -> 'adamw')."""
    if len(name) > 100:  # nothing is close to it, and difflib would take its time to say so
        return ""
    by_folded: dict[str, str] = {}
    for choice in choices:
        by_folded.setdefault(choice.casefold(), choice)
    close = difflib.get_close_matches(name.casefold(), list(by_folded), n=1, cutoff=0.5)
    return f" (did you mean {by_folded[close[0]]!r}?)" if close else ""


def check_name(kind: str, name: str, where: str) -> None:
    """Raise a SfdiagError unless ``name`` is a registry key or an import path."""
    table = REGISTRIES[kind]
    if name in table or is_import_path(name):
        return
    raise SfdiagError(
        f"{where}: unknown {kind} {shown(name)}{did_you_mean(name, tuple(table))}; "
        f"known: {', '.join(table)}, or an import path 'package.module:attribute'"
    )


def target_of(kind: str, name: str) -> str:
    """The import path behind a registry name (or the import path itself)."""
    table = REGISTRIES[kind]
    return table[name].target if name in table else name


@contextmanager
def _current_directory_importable() -> Iterator[None]:
    """The current directory first on ``sys.path`` while importing, as ``python -m sfdiag``
    has it (the ``sfdiag`` console script's ``sys.path[0]`` is its own bin directory), so
    ``mymodels:make`` finds ./mymodels.py with both; ``sys.path`` is restored afterwards."""
    try:
        cwd = os.getcwd()
    except OSError:  # the directory was removed under us: nothing to find there
        yield
        return
    if any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path):
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if cwd in sys.path:
            sys.path.remove(cwd)


def import_object(path: str, where: str) -> Any:
    """Import "package.module:attribute" (attribute may be dotted), looking in the current
    directory too.

    Importing runs the module's code: configs that name import paths are trusted code.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise SfdiagError(
            f"{where}: {shown(path)} is not an import path of the form 'package.module:attribute'"
        )
    try:
        with _current_directory_importable():
            obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SfdiagError(
            f"{where}: cannot import {shown(path)}: no module named {shown(exc.name)}"
        ) from exc
    except Exception as exc:  # the module's own code failed while importing
        raise SfdiagError(
            f"{where}: cannot import {shown(path)}: importing {shown(module_name)} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise SfdiagError(
                f"{where}: cannot import {shown(path)}: module {shown(module_name)} "
                f"has no attribute {shown(attr)}"
            ) from exc
    return obj


def load(kind: str, name: str, where: str) -> Any:
    """Resolve a registry name or import path of the given kind to its object."""
    check_name(kind, name, where)
    return import_object(target_of(kind, name), where)
