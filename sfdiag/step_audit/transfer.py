"""What a snapshot asks of the device, as pieces of one transfer to the host.

``_Pending`` collects the results a snapshot computes on the grads' device (norms,
checksums, samples: each known by its slot) and brings them over in one call; ``pack``
is that call on an accelerator: every piece in one byte buffer, one copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sfdiag.step_audit.fingerprint import _bits

#: each piece of a packed buffer starts at a multiple of this many bytes: a view as a dtype
#: needs its offset divisible by the dtype's size (65 int32 block sums are 260 bytes)
PACK_ALIGN = 16


def pack(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """``pieces`` packed into one byte buffer on their device, copied to the host in one
    transfer, and cut back into tensors of their dtypes and shapes."""
    device = pieces[0].device
    flat = [p.detach().to(device).contiguous().reshape(-1) for p in pieces]
    padding = torch.zeros(PACK_ALIGN, dtype=torch.uint8, device=device)
    parts, starts, start = [], [], 0
    for p in flat:
        starts.append(start)
        size = p.numel() * p.element_size()
        parts.append(p.view(torch.uint8))
        gap = -size % PACK_ALIGN
        if gap:
            parts.append(padding[:gap])
        start += size + gap
    packed = torch.cat(parts).cpu()
    return [
        packed[begin : begin + p.numel() * p.element_size()].view(p.dtype).view(original.shape)
        for begin, p, original in zip(starts, flat, pieces, strict=True)
    ]


@dataclass
class _Pending:
    """What one snapshot asks of the device, as pieces for one transfer; each result is known
    by its slot (a piece of k rows stands for k results, one per row). After ``fetch()``,
    ``array(slot)`` is a result as numpy (checksums, norms: one conversion per piece, rows
    as numpy views), ``bits(slot)`` its bits so, and ``tensor(slot)`` it as a tensor
    (samples, state)."""

    pieces: list[torch.Tensor] = field(default_factory=list)
    # slot -> (piece, row): a row index, a slice of rows, or None for the whole piece
    where: list[tuple[int, int | slice | None]] = field(default_factory=list)
    host: list[torch.Tensor] = field(default_factory=list)  # on the host, after fetch()
    _arrays: dict[int, Any] = field(default_factory=dict)
    _bits: dict[int, Any] = field(default_factory=dict)
    _rows: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def add(self, t: torch.Tensor) -> int:
        self.where.append((len(self.pieces), None))
        self.pieces.append(t)
        return len(self.where) - 1

    def add_segments(self, t: torch.Tensor, bounds: list[tuple[int, int]]) -> range:
        """``t[a:b]`` for each (a, b) of ``bounds``, as results of one piece."""
        piece, first = len(self.pieces), len(self.where)
        self.pieces.append(t)
        self.where.extend((piece, slice(a, b)) for a, b in bounds)
        return range(first, len(self.where))

    def add_rows(self, stacked: torch.Tensor) -> range:
        piece, first = len(self.pieces), len(self.where)
        self.pieces.append(stacked)
        self.where.extend((piece, row) for row in range(len(stacked)))
        return range(first, len(self.where))

    def fetch(self, to_host: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> None:
        """Bring the pieces to the host through ``to_host`` (``snapshot._to_host``)."""
        self.host = to_host(self.pieces)

    def array(self, slot: int) -> Any:
        return self._numpy(slot, self._arrays, torch.Tensor.numpy)

    def bits(self, slot: int) -> Any:
        """A result's bits as numpy (a float's as the integers of its width: numpy has no
        bfloat16), for hashing."""
        return self._numpy(slot, self._bits, lambda piece: _bits(piece).numpy())

    def _numpy(self, slot: int, cache: dict[int, Any], convert: Callable[..., Any]) -> Any:
        """The slot's result from its piece converted once (``cache``), a row a view."""
        piece, row = self.where[slot]
        array = self._piece(piece, cache, convert)
        return array if row is None else array[row]

    def _piece(self, piece: int, cache: dict[int, Any], convert: Callable[..., Any]) -> Any:
        array = cache.get(piece)
        if array is None:
            array = cache[piece] = convert(self.host[piece])
        return array

    def whole(self, slot: int) -> Any:
        """The whole piece ``slot`` lies in, as numpy (all the rows of its stack)."""
        return self._piece(self.where[slot][0], self._arrays, torch.Tensor.numpy)

    def whole_bits(self, slot: int) -> Any:
        """``whole`` as the bits of its elements (``bits``)."""
        return self._piece(self.where[slot][0], self._bits, lambda piece: _bits(piece).numpy())

    def tensor(self, slot: int) -> torch.Tensor:
        piece, row = self.where[slot]
        if row is None or isinstance(row, slice):
            return self.host[piece] if row is None else self.host[piece][row]
        rows = self._rows.get(piece)
        if rows is None:
            rows = self._rows[piece] = self.host[piece].unbind(0)
        return rows[row]


def _stacked(
    results: dict[Any, torch.Tensor], pending: _Pending, *, views: bool = False
) -> dict[Any, int]:
    """Each of ``results`` (a tensor per grad, or per grad and name) added to ``pending``,
    those of one shape, dtype and device as the rows of one stack: on an accelerator each
    piece of a transfer costs the host several ops. ``views``: the results are views of live
    tensors (a stack copies them; a lone one is cloned, so that no fingerprint holds a view
    of a grad or of the optimizer's state)."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for i, t in results.items():
        groups.setdefault((t.shape, t.dtype, t.device), []).append(i)
    slots: dict[Any, int] = {}
    for indices in groups.values():
        if len(indices) == 1:
            lone = results[indices[0]]
            slots[indices[0]] = pending.add(lone.clone() if views else lone)
        else:
            stacked = torch.stack([results[i] for i in indices])
            slots.update(zip(indices, pending.add_rows(stacked), strict=True))
    return slots
