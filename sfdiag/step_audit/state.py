"""The optimizer's per-element state of a param (tensors of its shape), read for naming
the kind of a mutation: by name, sampled alike with its grad, or for many params at once."""

from __future__ import annotations

import operator
from typing import Any

import torch

from sfdiag.dist import local
from sfdiag.step_audit.grouping import stacked_rows
from sfdiag.step_audit.sampling import _sample_rows, _sample_view, sample_of


def _per_element_state(
    optimizer: Any, param: torch.Tensor, states: Any = None
) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors of ``param``'s shape, by name (a DTensor's as its local
    shard: the elements the param's samples hold). ``states``: the optimizer's ``state``,
    where the caller has it (one lookup for many params)."""
    if states is None:
        states = getattr(optimizer, "state", None)
    state = states.get(param, {}) if states is not None else {}
    shape = param.shape
    return {
        str(key): local(value)
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.shape == shape and value.numel() > 0
    }


def states_alike(state: Any, params: list[torch.Tensor]) -> dict[str, list[torch.Tensor]] | None:
    """``state_tensors`` of each of ``params`` (one group's: one shape, dtype and device), by
    name, where all hold plain tensors under the same names, those of the first param's
    shape per-element state in all: a dict lookup a param, not a filtered copy of its state
    each. None where they do not (the caller reads each param's). Whether every tensor of
    a name has the params' shape is told where they are stacked (``stacked_rows``: one
    check for all, by ``torch.stack``), and only for the names read."""
    if state is None or not params:
        return None
    shape = params[0].shape
    held = list(map(state.get, params))  # (a param is a key by identity)
    if set(map(type, held)) != {dict}:  # (None: a param without state)
        return None
    first = held[0]
    names = [
        key
        for key, value in first.items()
        if type(value) is torch.Tensor and value.shape == shape and value.numel() > 0
    ]
    keys = first.keys()
    if not all(map(keys.__eq__, map(dict.keys, held))):
        return None
    columns = {}
    for key in names:
        column = list(map(operator.itemgetter(key), held))
        if set(map(type, column)) != {torch.Tensor}:
            return None
        columns[str(key)] = column
    # the other entries (a step count) must be no per-element state in any of them either
    for key in keys - set(names):
        for each in held:
            value = each[key]
            if isinstance(value, torch.Tensor) and value.shape == shape and value.numel() > 0:
                return None
    return columns


def state_rows(optimizer: Any, params: list[torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``state_views`` of each of ``params`` (one group's), as the rows of one stack per
    name (for ``take(states_of_group=)``: copied with the snapshot, a few calls for the
    group). None where their states are not alike (``states_alike``, ``stacked_rows``)."""
    held = states_alike(getattr(optimizer, "state", None), params)
    if held is None:
        return None
    # (the whole tensors stacked, then sampled: a few torch calls for the group, not one a
    # param; a group's tensors are small)
    out = {}
    for name, column in held.items():
        stacked = stacked_rows(column, params[0].shape)
        if stacked is None:
            return None
        out[name] = _sample_rows(stacked, owned=True)
    return out


def state_samples(optimizer: Any, param: torch.Tensor, *, full: bool = False) -> dict[str, Any]:
    """The optimizer's per-element state of ``param`` (tensors of its shape), sampled alike,
    copied (``full``: whole)."""
    return {
        key: value.detach().clone() if full else sample_of(value)
        for key, value in _per_element_state(optimizer, param).items()
    }


def state_tensors(
    optimizer: Any, param: torch.Tensor, states: Any = None
) -> dict[str, torch.Tensor]:
    """The optimizer's per-element state of ``param`` (tensors of its shape), by name, as
    they are: for a caller that samples many params' alike in one stack."""
    return _per_element_state(optimizer, param, states)


def state_views(optimizer: Any, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """``state_samples``' elements as views, for ``take(states=)``: it copies them with the
    rest of a snapshot (on the state's device, in one stack per shape), under ``no_grad``."""
    return {key: _sample_view(value) for key, value in _per_element_state(optimizer, param).items()}


def state_bytes(optimizer: Any) -> int:
    """Bytes held in the optimizer's state tensors."""
    total = 0
    for per_param in getattr(optimizer, "state", {}).values():
        for value in per_param.values() if isinstance(per_param, dict) else ():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
