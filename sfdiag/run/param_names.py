"""The names of an optimizer's parameters, found in the modules the training code holds
(the frames around its first ``step()``): what a per-parameter metric such as
``grad_norm/encoder.0.weight`` is matched to. ``sfdiag.run.watch`` asks once per
optimizer."""

from __future__ import annotations

import os
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _reference(obj: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(obj)
    except TypeError:  # no weakref slot: keep it alive (it is stepping anyway)
        return lambda: obj


def _modules_near(frame: FrameType | None) -> Iterator[torch.nn.Module]:
    """nn.Modules the calling code holds: its frames' locals and their attributes."""
    import torch

    # frames of torch and of sfdiag itself hold no module of the user's
    sfdiag_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    skip = (os.path.dirname(torch.__file__) + os.sep, sfdiag_dir + os.sep)
    module_type = torch.nn.Module
    while frame is not None:
        if not frame.f_code.co_filename.startswith(skip):
            for value in list(frame.f_locals.values()):
                # type(), not isinstance(): isinstance reads __class__, which some objects
                # (torch.distributed.reduce_op) answer with a warning
                kind = type(value)
                if issubclass(kind, module_type):
                    yield value
                elif not issubclass(kind, (type, types.ModuleType)):
                    attrs = _plain_attributes(value)
                    if attrs is not None and len(attrs) <= 256:
                        yield from (
                            v for v in list(attrs.values()) if issubclass(type(v), module_type)
                        )
        frame = frame.f_back


def _plain_attributes(value: Any) -> dict[str, Any] | None:
    """``vars(value)`` read without running any code of the object's (no properties, no
    ``__getattr__``: a module object's lazy attributes would warn or import)."""
    try:
        attrs = object.__getattribute__(value, "__dict__")
    except (AttributeError, TypeError):
        return None
    return attrs if isinstance(attrs, dict) else None


@dataclass
class ParamNames:
    """What the training code calls the optimizer's parameters.

    ``names``: one display name per parameter (``id -> name``), from the module that
    covers most of them. ``aliases``: every qualified name any module near the code gives a
    parameter, and every module path above one (``net.0.weight``, ``0.weight``, ``net.0``,
    ``net``), to the indices of the parameters it covers.
    """

    names: dict[int, str] = field(default_factory=dict)
    aliases: dict[str, tuple[int, ...]] = field(default_factory=dict)


def param_names(params: list[torch.Tensor], frame: FrameType | None) -> ParamNames:
    """Best effort names; parameters no module covers are left out (``param{i}``)."""
    index = {id(p): i for i, p in enumerate(params)}
    candidates: list[dict[int, str]] = []
    aliases: dict[str, set[int]] = {}
    seen: set[int] = set()
    for module in _modules_near(frame):
        if id(module) in seen:
            continue
        seen.add(id(module))
        named = {id(p): n for n, p in module.named_parameters() if id(p) in index}
        if not named:
            continue
        candidates.append(named)
        for key, name in named.items():
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                aliases.setdefault(".".join(parts[:end]), set()).add(index[key])
    candidates.sort(key=len, reverse=True)  # stable: on ties the innermost frame wins
    names: dict[int, str] = {}
    used: set[str] = set()
    for named in candidates:
        for key, name in named.items():
            if key not in names and name not in used:
                names[key] = name
                used.add(name)
    return ParamNames(names, {k: tuple(sorted(v)) for k, v in aliases.items()})


def _safe_names(params: list[torch.Tensor], frame: FrameType | None) -> ParamNames:
    try:
        return param_names(params, frame)
    except Exception:  # odd objects in the user's frames: fall back to param{i}
        return ParamNames()
