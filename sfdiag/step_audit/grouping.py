"""Which small grads a snapshot reads as a group (``snapshot.take``): those of one shape,
dtype and device, found with as few questions a grad as will tell, and after ``step()``
the groups read before it, kept where their grads are still the same tensors."""

from __future__ import annotations

import operator

import torch

from sfdiag.dist import is_dtensor, local
from sfdiag.step_audit.rows import Snapshot

#: a group's shape, dtype and device
GroupKey = tuple[torch.Size, torch.dtype, torch.device]


_SHAPE, _DTYPE = operator.attrgetter("shape"), operator.attrgetter("dtype")
_IS_CPU, _DEVICE = operator.attrgetter("is_cpu"), operator.attrgetter("device")
_NUMEL = operator.methodcaller("numel")


def small_groups(
    views: dict[int, torch.Tensor], candidates: list[int], limit: int
) -> list[tuple[GroupKey, list[int]]]:
    """The grads of ``candidates`` of at most ``limit`` elements that share a shape, dtype
    and device, two or more: by shape first (one key a grad, not three), then split where
    a shape's grads differ in dtype or device (as a rule they do not: one set each to
    tell)."""
    by_shape: dict[torch.Size, list[int]] = {}
    tensors = list(map(views.__getitem__, candidates))  # (the attributes read in C's loops)
    sizes = map(_NUMEL, tensors)
    for i, shape, size in zip(candidates, map(_SHAPE, tensors), sizes, strict=True):
        if size <= limit:
            by_shape.setdefault(shape, []).append(i)
    out: list[tuple[GroupKey, list[int]]] = []
    for shape, indices in by_shape.items():
        if len(indices) < 2:
            continue
        members = list(map(views.__getitem__, indices))
        if len(set(map(_DTYPE, members))) == 1 and (
            all(map(_IS_CPU, members)) or len(set(map(_DEVICE, members))) == 1
        ):
            out.append(((shape, members[0].dtype, members[0].device), indices))
            continue
        split: dict[GroupKey, list[int]] = {}
        for i, view in zip(indices, members, strict=True):
            split.setdefault((shape, view.dtype, view.device), []).append(i)
        out += [(key, found) for key, found in split.items() if len(found) > 1]
    return out


def groups_again(
    before: Snapshot, grads: list[torch.Tensor | None]
) -> list[tuple[GroupKey, list[int]]]:
    """The groups ``before`` read whose grads are still those tensors, plain, in that dtype
    (after ``step()``, as a rule: every group), to be read as groups again without looking
    for them grad by grad. (A grad's shape or device can move with ``.data =`` too: the
    group's stack refuses the first, ``take`` checks both.)"""
    out: list[tuple[GroupKey, list[int]]] = []
    for indices, group in before.groups.items():
        members = [grads[i] for i in indices]
        if (
            group.key is not None
            and {type(g) for g in members} == {torch.Tensor}
            and all(map(operator.is_, group.grads, members))
            and {g.dtype for g in members} == {group.key[1]}
        ):
            out.append((group.key, list(indices)))
    return out


def stacked_params(params: list[torch.Tensor], indices: list[int]) -> torch.Tensor | None:
    """A group's params (``indices``; their local shards) stacked, a row each in the group's
    order, where they share a shape, dtype and device (a param is laid out as its grad, as
    a rule); None where they do not."""
    shards = [params[i] for i in indices]
    if any(map(is_dtensor, {type(s): s for s in shards}.values())):  # (a matter of class)
        shards = [local(s) for s in shards]
    # torch.stack refuses tensors of other shapes or devices, but promotes other dtypes
    if len({s.dtype for s in shards}) != 1:
        return None
    return stacked_rows(shards, shards[0].shape)


def stacked_rows(tensors: list[torch.Tensor], shape: torch.Size) -> torch.Tensor | None:
    """``tensors`` as the rows of one stack (flat), where every one has ``shape``:
    ``torch.stack`` refuses tensors of other shapes (or devices), and the stack's shape says
    whether theirs is ``shape`` (all of them may have moved alike). None where not."""
    try:
        stacked = torch.stack(tensors)
    except RuntimeError:
        return None
    if stacked.shape[1:] != shape:
        return None
    return stacked.reshape(len(tensors), -1)
