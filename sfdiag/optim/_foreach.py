"""Feeding ``torch._foreach_*`` ops: group rows of tensors by device and dtype, and tile them.

A *row* is the tensors of one parameter that an update touches together, e.g.
``(y, grad, z, v)``. The foreach ops want *columns*: one list per role. A step builds
its columns directly (``local_columns``, ``columns_by_device_and_dtype``): a tuple a
parameter would be garbage for the collector to walk, every step.

On CUDA a foreach op over every tensor is one multi-tensor kernel launch, so each
(device, dtype) group goes in whole. On CPU a foreach op is a loop of per-tensor
kernels: running an update of N ops as N full passes over 4-5 buffers streams each
buffer from DRAM N times. ``tiles_of_columns`` therefore cuts the CPU rows into flat pieces
of about ``CPU_TILE_BYTES`` per buffer and runs the whole op sequence on one tile
before moving on, so every op after the first finds the tile in cache. Tiling only
changes the order in which elements are visited; the arithmetic per element is the
same, so it is exact.

``scalar_operand`` turns a Python number into the argument that a CPU foreach op
takes most cheaply (see there).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from sfdiag.dist import is_dtensor, local

__all__ = [
    "CPU_TILE_BYTES",
    "CPU_WHOLE_TILES",
    "columns_by_device_and_dtype",
    "local_columns",
    "scalar_operand",
    "shards",
    "tiles_of_columns",
    "tiles_of_group",
]

# Per buffer: the five buffers of a tile sit in a core's L2 (or L3) while the sequence of
# ops runs over them. Measured on a 25M-parameter step: tiles 1.5-2x faster than whole
# tensors on a 2-core EPYC (L2 1 MiB a core; 0.5 to 2 MiB a buffer within 3 % there); on a
# Xeon with 2 MiB of L2 a core, 256 KiB and 512 KiB 11 % faster than 2 MiB (which streams
# from L3) and 2 % faster than a loop over whole tensors.
CPU_TILE_BYTES = 1 << 19
# A group of up to this many tiles goes in whole: there each op's cost a call outweighs the
# cache (2,000 tiny tensors, 1 MiB a buffer, in three tiles: a 3-7 % slower step).
CPU_WHOLE_TILES = 4

Row = Sequence[Tensor]


def shards(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors as this process holds them: a DTensor (FSDP2) as its local shard, a view
    of its storage, so in-place ops write through. Every update here is elementwise, so
    updating the shards is updating the whole, without DTensor's dispatch per op."""
    if any(map(is_dtensor, tensors)):
        return tuple(local(t) for t in tensors)
    return tensors  # plain tensors, as a rule: asked for every row of every step


def local_columns(columns: list[list[Tensor]]) -> list[list[Tensor]]:
    """The tensors of ``columns`` (one list per role, the parameters first) as this
    process holds them: ``columns`` themselves where the parameters are plain tensors, as a
    rule; else each through ``local`` (a DTensor's shard, a view of its storage, so in-place
    ops write through; anything else itself). A parameter's grad and state are DTensors
    exactly where it is one, and whether a tensor is one is a matter of its class, so one
    parameter of each class is asked (a step asks this of every parameter)."""
    one_of_each = {type(t): t for t in columns[0]}
    if any(map(is_dtensor, one_of_each.values())):
        return [[local(t) for t in column] for column in columns]
    return columns


def columns_by_device_and_dtype(columns: list[list[Tensor]]) -> Iterator[list[list[Tensor]]]:
    """``columns`` (one list per role, the parameters first), one set per (device, dtype)
    of the parameter: ``columns`` themselves where every parameter is on one device in one
    dtype, as a rule. Columns, not a tuple a parameter: a step builds none per tensor (a
    tuple each is garbage the collector walks, a full collection every few dozen steps of
    a model of a thousand tensors)."""
    firsts = columns[0]
    if not firsts:
        return
    if len({t.dtype for t in firsts}) == 1 and len({t.device for t in firsts}) == 1:
        yield columns
        return
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(firsts):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for indices in groups.values():
        yield [[column[i] for i in indices] for column in columns]


def _flat(row: Row) -> tuple[Tensor, ...] | None:
    """1-D views of every tensor of the row, or None when they cannot be sliced alike."""
    if all(t.is_contiguous() for t in row):
        return tuple(t.detach().view(-1) for t in row)
    return None


def _tile_elems(first: Tensor) -> int | None:
    if first.device.type != "cpu":
        return None
    return max(1, CPU_TILE_BYTES // first.element_size())


def tiles_of_columns(columns: list[list[Tensor]]) -> Iterator[list[list[Tensor]]]:
    """``columns`` (one list per role, the parameters first) in tiles: per (device, dtype),
    and on CPU in cache-sized pieces. Large contiguous tensors are split into flat slices
    (views: in-place ops on them write through to the parameters, gradients and state);
    small tensors are packed together until a tile is full."""
    for group in columns_by_device_and_dtype(columns):
        yield from tiles_of_group(group)


def tiles_of_group(columns: list[list[Tensor]]) -> Iterator[list[list[Tensor]]]:
    """``tiles_of_columns`` of one (device, dtype) group (``columns_by_device_and_dtype``).

    Rows that fit whole are taken as runs (slices of the columns, not a row at a time: a
    model of thousands of small tensors pays one size a tensor here, not a tuple)."""
    limit = _tile_elems(columns[0][0])
    if limit is None:
        yield columns  # off the CPU
        return
    sizes = [t.numel() for t in columns[0]]
    if sum(sizes) <= limit * CPU_WHOLE_TILES:
        yield columns  # (many small tensors) all in one tile
        return

    tile: list[range | tuple[Tensor, ...]] = []  # runs of whole rows, and rows or slices
    run_from = -1  # the first row of the run of whole rows the tile ends with (-1: none)
    filled = 0
    for i, n in enumerate(sizes):
        if filled + n <= limit:
            if run_from < 0:
                run_from = i
            filled += n
        else:
            if run_from >= 0:
                tile.append(range(run_from, i))
                run_from = -1
            row = tuple(column[i] for column in columns)
            flat = _flat(row)
            if flat is None:  # cannot be sliced: it starts a tile of its own
                if tile:
                    yield _tile_columns(columns, tile)
                    tile, filled = [], 0
                tile.append(row)
                filled += n
            else:
                start = 0
                while start < n:
                    take = min(n - start, limit - filled)
                    tile.append(tuple(t[start : start + take] for t in flat))
                    filled += take
                    start += take
                    if filled >= limit:
                        yield _tile_columns(columns, tile)
                        tile, filled = [], 0
        if filled >= limit:
            if run_from >= 0:
                tile.append(range(run_from, i + 1))
                run_from = -1
            yield _tile_columns(columns, tile)
            tile, filled = [], 0
    if run_from >= 0:
        tile.append(range(run_from, len(sizes)))
    if tile:
        yield _tile_columns(columns, tile)


def _tile_columns(
    columns: list[list[Tensor]], tile: list[range | tuple[Tensor, ...]]
) -> list[list[Tensor]]:
    """A tile's columns: each run of whole rows as a slice of every column, each row or
    slice of a row as its tensors."""
    out: list[list[Tensor]] = [[] for _ in columns]
    for part in tile:
        if isinstance(part, range):
            for column, whole in zip(out, columns, strict=True):
                column.extend(whole[part.start : part.stop])
        else:
            for column, tensor in zip(out, part, strict=True):
                column.append(tensor)
    return out


def scalar_operand(value: float, like: Tensor) -> float | Tensor:
    """``value`` as the scalar argument of a foreach op over tensors like ``like``.

    On the CPU a foreach op is a loop of per-tensor ops, and each one given a Python
    number first converts it to a tensor of the operands' dtype: an allocation and a copy
    per tensor, which costs more than the arithmetic on a tiny tensor. A 0-dim tensor of
    that dtype is that very conversion (the double rounded to the dtype), made once, so
    the results are the same bits. Make it once per step and (device, dtype) group, not
    per tile: on a large model, small allocations between the tiles' large temporaries
    cost more than they save (measured: 2%).

    Only for float32 and float64, where the kernels compute in that dtype: for
    float16/bfloat16 they compute in float32 from the unconverted number, which a
    pre-rounded operand would change. Off the CPU a foreach op is one kernel launch, and
    the number stays a number.
    """
    if like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64):
        # the device said, not left to a default device (torch.set_default_device)
        return torch.tensor(value, dtype=like.dtype, device=like.device)
    return value
