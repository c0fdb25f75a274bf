"""Cheap per-tensor fingerprints of ``p.grad``, taken just before and after ``step()``.

A fingerprint keeps a weak reference to the grad tensor (to tell "replaced" from
"changed in place" without holding memory), its L2 norm, integer checksums of its
bits (sums over blocks of elements, wrapping), its version counter and a small strided
sample of its elements (and of the parameter's). Detection never clones a whole
gradient by default: the extra memory is a few hundred elements per tensor.
``full=True`` (forensics) clones everything for exact per-element comparisons.

**Two reads per audited step.** Before ``step()`` every grad is read once for its norm
and its checksum together: on the CPU's large tensors by one call of a small C kernel for
all of them (``sfdiag.step_audit.fused``: compiled per process where a C compiler is present and the
grads are large enough to pay for it; the samples, its param's too, in the same pass), else
by torch's own ops (on a GPU always: there the host's time per launch is what counts). After
``step()`` (``take(..., before=)``) a grad that is the same tensor at the same version is
read once, for its checksum, and sampled (the sample's bits are hashed into the checksum;
the kernel again where it read the grad before): where the
checksum agrees with before, its fingerprint *is* the one from before (nothing else is built
for it); where the bits changed (an edit through ``.data`` moves no version counter) its
norm is read again. A grad whose version moved gets norm and checksum in one read, and its
optimizer state sampled for fingerprinting.

**Per tensor, a few ops.** Everything runs under ``no_grad``, so no view needs a detach (on a
GPU each torch call costs the host µs; ``tests/test_snapshot.py`` counts them). Samples,
and the optimizer state's, are views copied in one stack per dtype and length; small grads
of one size are stacked for their checksums; the fused kernel reads all large grads in one
call. What a large model's step pays on top of the two reads is mostly this Python, some
µs per tensor.

**One transfer per snapshot.** Everything a snapshot brings to the host (norms,
checksums, samples) is computed on the device and, on an accelerator, packed into one
buffer and copied once; on the CPU there is nothing to copy. Comparisons then run on
the host copies. (Forensics clones and the rare ``.data`` case above cost more.)

Comparisons are on bits, so NaN equals NaN and a clean optimizer with NaN gradients is
never mistaken for a mutating one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import struct
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from sfdiag.dist import local
from sfdiag.step_audit import fused

#: elements sampled per tensor for fingerprinting the kind of a mutation
SAMPLE_SIZE = 256

#: the checksum sums the bits of this many consecutive blocks separately, in the same one
#: read: an edit that cancels out in a whole-tensor sum (two sign flips, a swap) is caught
#: unless both elements fall in the same block.
CHECKSUM_BLOCKS = 64

#: the fused kernel's block: this many elements (its rows); tensors of fewer than
#: ``FUSED_MIN_ROWS`` blocks take torch's own ops
FUSED_BLOCK = 65536
FUSED_MIN_ROWS = 4
#: the CPU's large grads take the fused layout (and kernel) once those of one snapshot hold
#: this many elements: a read of them saved each step pays for compiling the kernel (~0.1 s)
#: within a few hundred steps (``SFDIAG_FUSED=1``: whatever they hold, ``=0``: never)
FUSED_MIN_ELEMENTS = 4_000_000

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}

#: a param -> its optimizer state's sampled elements, by name (views will do: ``take``
#: copies them with the rest; ``state_views`` is one)
StateSampler = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True, slots=True)
class GradFingerprint:
    """One parameter's grad at one moment. ``ref is None`` means ``p.grad is None``.

    Samples live on the host (CPU tensors), whatever the grad's device.
    """

    ref: weakref.ref | None
    version: int
    norm: float
    # a 128-bit digest of the block bit-sums, the sample's bits (and a sparse grad's index
    # sum): equal for equal grads, with 16 bytes held where the sums take hundreds
    checksum: bytes
    sample: torch.Tensor | None  # the elements sample_positions() names (all of a small tensor)
    param_sample: torch.Tensor | None  # the parameter at the same elements
    full: torch.Tensor | None = None  # forensics: a full clone (on the grad's device)
    full_param: torch.Tensor | None = None
    # the optimizer's per-element state at the same elements (post-step, where the grad's
    # version moved): what names the kind of a mutation
    states: dict[str, torch.Tensor] | None = None
    layout: str = "blocks"  # the checksum's blocks: CHECKSUM_BLOCKS ("blocks") or "fused"

    @property
    def present(self) -> bool:
        return self.ref is not None

    def same_content(self, other: GradFingerprint) -> bool:
        if other is self:  # an unchanged grad's fingerprint after step() is the one before
            return True
        # norm compared by bits: NaN == NaN here, and -0.0 vs 0.0 would count as a change.
        # The checksum covers the sample's bits too.
        if float_bits(self.norm) != float_bits(other.norm) or self.checksum != other.checksum:
            return False
        if self.full is not None and other.full is not None:
            return _bits_equal(self.full, other.full)
        return True


def float_bits(value: float) -> int:
    """The bits of a float as an int: equal for equal floats, NaN included."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.element_size()]) if t.is_floating_point() else t


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _dense_view(grad: torch.Tensor) -> torch.Tensor:
    """The elements a fingerprint reads: a sparse grad's stored values, a DTensor's local
    shard (never the whole tensor), else the tensor."""
    grad = local(grad)
    if grad.layout != torch.strided:
        return grad._values()
    return grad


def holds_a_number(grad: torch.Tensor) -> bool:
    """Whether any element a fingerprint reads of ``grad`` is finite and non-zero (one read,
    one host sync: for grads whose norm is NaN or Inf)."""
    view = _dense_view(grad).detach()
    if not (view.is_floating_point() or view.is_complex()):
        return bool(view.any())
    return bool((torch.isfinite(view) & (view != 0)).any())


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def sample_positions(n: int) -> list[int]:
    """The elements a sample of an ``n``-element tensor holds, in order (flat indices).

    Single elements at an even stride, not runs of consecutive ones (which would cost a
    large grad fewer cache misses: 0.6 ms a step at 100M parameters for 64 runs of 4, 1.5 ms
    for 16 of 16): a grad that is mostly zeros, like an embedding's with only the batch's
    rows set, must still show the sample non-zero elements for the kind of its mutation to
    be named. With 4 % of the rows set, 256 places all miss them once in 35,000 steps, 64
    runs once in 14, 16 runs every other step."""
    if n <= SAMPLE_SIZE:
        return list(range(n))
    step = n // SAMPLE_SIZE
    return list(range(0, step * SAMPLE_SIZE, step))


def _sample_view(t: torch.Tensor) -> torch.Tensor:
    """The elements ``sample_positions`` names of ``t``: a view (of a detached ``t``, or
    under ``no_grad``)."""
    n = t.numel()
    if n <= SAMPLE_SIZE:
        return _flat(t)
    step = n // SAMPLE_SIZE
    if t.is_contiguous():  # one op instead of three: a large model samples hundreds a step
        return t.as_strided((SAMPLE_SIZE,), (step,), t.storage_offset())
    return _flat(t)[: step * SAMPLE_SIZE : step]


def sample_view(t: torch.Tensor) -> torch.Tensor:
    """The elements ``sample_positions`` names of ``t``, as a view (not copied)."""
    return _sample_view(t.detach())


def sample_of(t: torch.Tensor) -> torch.Tensor:
    """The elements ``sample_positions`` names of ``t``, copied."""
    return _sample_view(t.detach()).clone()


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """Per-block sums of the elements' bits, wrapping in their own integer type.

    Integer sums are exact in any order. Not ``sum(dtype=torch.int64)``: on CPU that first
    copies the whole tensor to int64 (twice a float32 grad's bytes, at every snapshot).
    Returns CHECKSUM_BLOCKS sums, and the sum of the elements left over after them where
    there are any: ``_checksum_rows`` of ``t`` as one row. A contiguous ``t`` of whole
    blocks, as most are, takes three torch calls here instead (on a GPU each costs the host
    µs).
    """
    per_block, left = divmod(t.numel(), CHECKSUM_BLOCKS)
    if not left and t.is_contiguous():
        bits = _bits(t)
        return bits.view(CHECKSUM_BLOCKS, per_block).sum(dim=1, dtype=bits.dtype)
    return _checksum_rows(_flat(t).unsqueeze(0))[0]


def _checksum_rows(rows: torch.Tensor) -> torch.Tensor:
    """``_checksum`` of each row of ``rows`` ([k, n], k tensors of one size)."""
    bits = _bits(rows)
    count, n = bits.shape
    per_block = n // CHECKSUM_BLOCKS
    split = per_block * CHECKSUM_BLOCKS
    blocks = bits[:, :split].reshape(count, CHECKSUM_BLOCKS, per_block).sum(dim=2, dtype=bits.dtype)
    if split == n:
        return blocks
    rest = bits[:, split:].sum(dim=1, keepdim=True, dtype=bits.dtype)
    return torch.cat([blocks, rest], dim=1)


def _sample_rows(rows: torch.Tensor) -> torch.Tensor:
    """``sample_of`` each row of ``rows`` ([k, n]), in one copy."""
    n = rows.shape[1]
    if n <= SAMPLE_SIZE:
        return rows.clone()
    step = n // SAMPLE_SIZE
    return rows[:, : step * SAMPLE_SIZE : step].clone()


#: small grads of one size are read together (a model's many biases and norms): one
#: stacked copy, then one op for all their checksums and one for their samples
SMALL_TENSOR = 65536


# ---- the fused read: norm and checksum in one pass ---------------------------------------------
def _fused_setting() -> str:
    """``SFDIAG_FUSED``: "off", "on" (the fused layout for every large grad) or "auto"."""
    setting = os.environ.get("SFDIAG_FUSED", "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return "off"
    return "on" if setting in ("1", "on", "true", "yes") else "auto"


def _fused_grads(views: dict[int, torch.Tensor]) -> set[int]:
    """The grads of a snapshot that take the fused layout (rows of FUSED_BLOCK elements).

    On the CPU, in "auto": the large ones, once they hold enough elements for the fused
    kernel (``fused``) to pay for compiling it. On an accelerator: every large one,
    always, read by torch's ops: one launch a grad for its row sums, norms by
    ``_foreach_norm`` in a few for all (bench/RESULTS.md). "on": every large grad, anywhere."""
    setting = _fused_setting()
    if setting == "off":
        return set()
    eligible = {i for i, v in views.items() if _fused_eligible(v)}
    if setting == "on":
        return eligible
    on_cpu = {i for i in eligible if views[i].device.type == "cpu"}
    pays = fused.broken() is None and sum(views[i].numel() for i in on_cpu) >= FUSED_MIN_ELEMENTS
    return (eligible - on_cpu) | (on_cpu if pays else set())


def _fused_eligible(view: torch.Tensor) -> bool:
    return (
        view.numel() >= FUSED_MIN_ROWS * FUSED_BLOCK  # first: most grads are smaller
        and view.layout == torch.strided
        and view.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and view.is_contiguous()
    )


def _kernel_reads(view: torch.Tensor) -> bool:
    """Whether the fused kernel reads a grad of the fused layout (else torch's ops do)."""
    return fused.supports(view) and view.numel() >= SAMPLE_SIZE  # (a replaced grad may be small)


def _kernel_param(param: torch.Tensor, view: torch.Tensor) -> torch.Tensor | None:
    """``param`` (its local shard) where the kernel can sample it with ``view``, its (dense)
    grad's view: laid out alike."""
    param = local(param)
    if (
        param.dtype == view.dtype
        and param.shape == view.shape
        and param.is_contiguous()
        and param.device == view.device
    ):
        return param
    return None


def _rows_and_tail(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``view``'s elements as ``[n, FUSED_BLOCK]`` rows, and those left over (None: none).

    A view of the grad (``view``: detached); a copy only where a grad that had this layout
    before ``step()`` was replaced by a non-contiguous tensor."""
    count, left = divmod(view.numel(), FUSED_BLOCK)
    if not left and view.is_contiguous():  # the rule: one op, on a GPU one host call
        return view.view(count, FUSED_BLOCK), None
    flat = view.reshape(-1)
    if not left:
        return flat.view(count, FUSED_BLOCK), None
    return flat[: count * FUSED_BLOCK].view(count, FUSED_BLOCK), flat[count * FUSED_BLOCK :]


def _with_tail(sums: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """The rows' bit-sums, and the tail's after them where there is one."""
    if tail is None:
        return sums
    tail_bits = _bits(tail)
    return torch.cat([sums, tail_bits.sum(dtype=tail_bits.dtype).reshape(1)])


def _fused_sums_only(view: torch.Tensor) -> torch.Tensor:
    """The fused kernel's row checksums of ``view``, by torch's ops (one read; for a grad
    whose norm is known)."""
    rows, tail = _rows_and_tail(view)
    bits = _bits(rows)
    return _with_tail(bits.sum(dim=1, dtype=bits.dtype), tail)


# ---- one transfer to the host ---------------------------------------------------------------
def _to_host(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """``pieces`` on the CPU: as they are when they already live there; else ``pack``-ed."""
    if not pieces or all(p.device.type == "cpu" for p in pieces):
        return pieces
    return pack(pieces)


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

    def fetch(self) -> None:
        self.host = _to_host(self.pieces)

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


def _stacked_samples(views: dict[int, torch.Tensor], pending: _Pending) -> dict[int, int]:
    """A sample of each of ``views``: one copy per dtype, device and sample length."""
    return _stacked({i: _sample_view(v) for i, v in views.items()}, pending, views=True)


def _layouts(
    views: dict[int, torch.Tensor], before: list[GradFingerprint] | None
) -> dict[int, str]:
    """Each grad's checksum layout: kept from before ``step()`` to after, whatever happens;
    "fused" (rows of FUSED_BLOCK elements) for the grads ``_fused_grads`` picks, "blocks"
    for the others."""
    kept = {} if before is None else {i: before[i].layout for i in views if before[i].present}
    if len(kept) == len(views):  # after step(), as a rule: nothing to decide
        return kept
    fused = _fused_grads(views)
    return {i: kept.get(i) or ("fused" if i in fused else "blocks") for i in views}


def _unchanged(grads: list[torch.Tensor | None], before: list[GradFingerprint] | None) -> set[int]:
    """The grads that are still the tensors ``before`` saw, at the versions it saw."""
    if before is None:
        return set()
    return {
        i
        for i, g in enumerate(grads)
        if g is not None
        and before[i].present
        and before[i].ref() is g
        and before[i].version == g._version
    }


class Snapshot(list):
    """The fingerprints ``take`` returns, one per parameter, and what the snapshot after
    ``step()`` compares against in arrays: per group of small grads read together (their
    indices, in order), the rows of their block sums and of their samples' bits."""

    def __init__(self, prints: list[GradFingerprint], groups: dict[tuple[int, ...], Any]):
        super().__init__(prints)
        self.groups = groups


def _stayed(
    indices: tuple[int, ...], rows: tuple[Any, Any], before: list[GradFingerprint] | None
) -> Any:
    """Which of a group's grads (``rows``: their block sums and samples' bits now) are bit
    for bit what ``before`` read of the same group: one comparison of two arrays, no
    digest a grad. None where ``before`` has no such group."""
    kept = getattr(before, "groups", {}).get(indices)
    if kept is None or kept[0].shape != rows[0].shape or kept[1].shape != rows[1].shape:
        return None
    return (kept[0] == rows[0]).all(axis=1) & (kept[1] == rows[1]).all(axis=1)


@torch.no_grad()  # the hooks run with grad on, and a create_graph=True grad has a graph
def take(
    params: list[torch.Tensor],
    *,
    full: bool = False,
    param_samples: bool | Collection[int] = True,
    before: list[GradFingerprint] | None = None,
    states: StateSampler | None = None,
) -> list[GradFingerprint]:
    """Fingerprint every parameter's ``.grad`` (see the module doc).

    ``before``: the pre-step snapshot of the same ``params``; a grad that is still that
    tensor at that version is read for its checksum and sampled, not for its norm, and
    where its checksum (which covers the sample) agrees its fingerprint is the one from
    before. ``states(param)``: the optimizer's per-element state of a param, sampled where
    its grad's version moved.
    ``param_samples``: which parameters are sampled too (True: all, False: none, else their
    indices in ``params``); the auditor reads them from the snapshot before ``step()`` only,
    where a grad mutated.
    """
    grads = [p.grad for p in params]
    sample_params = set(range(len(params))) if param_samples is True else set(param_samples or ())
    # under no_grad: no view or copy taken here needs a detach (one host call a tensor saved)
    views: dict[int, torch.Tensor] = {
        i: _dense_view(g) for i, g in enumerate(grads) if g is not None
    }
    unchanged = _unchanged(grads, before)
    layouts = _layouts(views, before)
    pending = _Pending()
    norm_at: dict[int, int] = {}
    sample_at: dict[int, int] = {}

    # the fused layout's grads on the CPU: one call of the kernel per dtype reads them all
    # for their checksums and samples, and where the version moved for their norms too
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, layout in layouts.items():
        if layout == "fused" and _kernel_reads(views[i]):
            by_dtype.setdefault(views[i].dtype, []).append(i)
    squares_at: dict[int, int] = {}  # the kernel's sums of squares
    sums_at: dict[int, int] = {}
    param_at: dict[int, int] = {}
    for indices in by_dtype.values():
        want = [i not in unchanged for i in indices]
        # the params' samples too, in the same pass, where they are laid out like the grads
        sampled = [
            _kernel_param(params[i], views[i])
            if i in sample_params and grads[i].layout == torch.strided  # (as below)
            else None
            for i in indices
        ]
        read = fused.read([views[i] for i in indices], want, FUSED_BLOCK, SAMPLE_SIZE, sampled)
        if read is None:  # no compiler here: torch's ops read them below
            continue
        squares = pending.add_rows(read.squares)
        sums = pending.add_segments(read.row_sums, read.bounds)
        samples = pending.add_rows(read.samples)
        param_rows = pending.add_rows(read.param_samples) if read.param_samples.numel() else ()
        for k, i in enumerate(indices):
            sums_at[i], sample_at[i] = sums[k], samples[k]
            if want[k]:
                squares_at[i] = squares[k]
            if sampled[k] is not None:
                param_at[i] = param_rows[k]

    plain_norms = []
    same_shape: dict[tuple[Any, ...], list[int]] = {}
    for i, view in views.items():
        if (
            i not in sums_at
            and layouts[i] == "blocks"
            and view.layout == torch.strided
            and view.numel() <= SMALL_TENSOR
        ):
            same_shape.setdefault((view.shape, view.dtype, view.device), []).append(i)
    groups: dict[tuple[int, ...], tuple[int, int]] = {}  # indices -> (sums, samples) pieces
    for indices in same_shape.values():
        if len(indices) < 2:
            continue
        # one stack of the grads as they are (one shape: no view a grad), then rows
        stacked = torch.stack([views[i] for i in indices]).reshape(len(indices), -1)
        checksums = pending.add_rows(_checksum_rows(stacked))
        samples = pending.add_rows(_sample_rows(stacked))
        groups[tuple(indices)] = (checksums[0], samples[0])
        for i, sums, sample in zip(indices, checksums, samples, strict=True):
            sums_at[i], sample_at[i] = sums, sample
            if i not in unchanged:
                plain_norms.append(i)
    loose: dict[int, torch.Tensor] = {}
    for i, view in views.items():
        if i in sums_at:
            continue
        loose[i] = _fused_sums_only(view) if layouts[i] == "fused" else _checksum(view)
        if i not in unchanged:
            plain_norms.append(i)
    sums_at.update(_stacked(loose, pending))
    del loose
    # small CPU grads: one call of the kernel per dtype (float64 sums; torch's norm costs the
    # host about a microsecond a tensor); the others through torch's ops
    small: dict[torch.dtype, list[int]] = {}
    for i in plain_norms:
        if fused.squares_reads(views[i]):
            small.setdefault(views[i].dtype, []).append(i)
    for indices in small.values():
        squares = fused.squares([views[i] for i in indices])
        if squares is not None:
            norm_at.update(zip(indices, pending.add_rows(squares.sqrt_()), strict=True))
    plain_norms = [i for i in plain_norms if i not in norm_at]
    if plain_norms:
        # one kernel per (device, dtype) group, one stack per device
        norms = torch._foreach_norm([views[i] for i in plain_norms])
        by_device: dict[torch.device, list[int]] = {}
        for k, norm in enumerate(norms):
            by_device.setdefault(norm.device, []).append(k)
        for ks in by_device.values():
            stacked = torch.stack([norms[k] for k in ks]).to(torch.float64)
            norm_at.update(
                zip([plain_norms[k] for k in ks], pending.add_rows(stacked), strict=True)
            )
    index_at = {
        i: pending.add(g._indices().sum().reshape(1).to(torch.int64))
        for i, g in enumerate(grads)
        if g is not None and g.layout == torch.sparse_coo
    }
    sample_at.update(
        _stacked_samples({i: v for i, v in views.items() if i not in sample_at}, pending)
    )
    param_at.update(
        _stacked_samples(
            {
                i: local(params[i])
                for i in sorted(sample_params - param_at.keys())
                if grads[i] is not None and grads[i].layout == torch.strided
            },
            pending,
        )
    )
    state_at: dict[int, dict[str, int]] = {}
    if states is not None:  # copied like the samples: one stack per shape, not one piece each
        sampled: dict[tuple[int, str], torch.Tensor] = {}
        for i in views:
            if i not in unchanged:
                state_at[i] = {}
                sampled.update(((i, k), v) for k, v in states(params[i]).items())
        for (i, k), slot in _stacked(sampled, pending, views=True).items():
            state_at[i][k] = slot
    pending.fetch()

    kept: dict[tuple[int, ...], Any] = {}
    stayed: set[int] = set()  # unchanged grads whose group's arrays equal before's, row by row
    for indices, (sums_slot, sample_slot) in groups.items():
        rows = (pending.whole(sums_slot), pending.whole_bits(sample_slot))
        kept[indices] = rows
        if not full and all(i in unchanged for i in indices):
            same = _stayed(indices, rows, before)
            if same is not None:
                stayed.update(i for i, equal in zip(indices, same.tolist(), strict=True) if equal)

    out: list[GradFingerprint] = []
    recheck: list[int] = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if i in stayed:  # the same tensor, version and bits: the fingerprint from before
            out.append(before[i])
            continue
        if g is None:
            out.append(GradFingerprint(None, 0, 0.0, b"", None, None))
            continue
        index_sum = pending.array(index_at[i]) if i in index_at else None
        checksum = _digest_of(pending.array(sums_at[i]), pending.bits(sample_at[i]), index_sum)
        if i in unchanged:  # the same tensor at the same version
            prior = before[i]
            if checksum != prior.checksum:
                recheck.append(i)  # changed behind the version counter (.data): read it
            elif not full:
                out.append(prior)  # nothing moved: the fingerprint from before holds
                continue
            norm = prior.norm  # read again below where the bits moved
        elif i in squares_at:
            norm = math.sqrt(float(pending.array(squares_at[i])))
        else:
            norm = float(pending.array(norm_at[i]))
        out.append(
            GradFingerprint(
                ref=weakref.ref(g),
                version=g._version,
                norm=norm,
                checksum=checksum,
                sample=pending.tensor(sample_at[i]),
                param_sample=pending.tensor(param_at[i]) if i in param_at else None,
                full=views[i].clone() if full else None,
                full_param=(
                    local(p).detach().clone()
                    if full and i in sample_params and g.layout == torch.strided
                    else None
                ),
                states={k: pending.tensor(j) for k, j in state_at[i].items()}
                if i in state_at
                else None,
                layout=layouts[i],
            )
        )
    for i in recheck:
        out[i] = _reread(out[i], views[i], params[i], states)
    return Snapshot(out, kept)


def _reread(
    fp: GradFingerprint, view: torch.Tensor, param: torch.Tensor, states: StateSampler | None
) -> GradFingerprint:
    """A grad whose bits changed behind its version counter: its norm and state, read now.
    The norm is read as before ``step()``: by the fused kernel where that read it (float64
    sums of squares; torch's float32 norm of a large grad differs in its last digits)."""
    squared = None  # the sum of squares, where a kernel reads it (as ``take`` did)
    if fp.layout == "fused" and _kernel_reads(view):
        read = fused.read([view], [True], FUSED_BLOCK, SAMPLE_SIZE)
        squared = read.squares[0] if read is not None else None
    elif fused.squares_reads(view):
        read = fused.squares([view])
        squared = read[0] if read is not None else None
    value = squared if squared is not None else torch._foreach_norm([view])[0].double()
    sampled = states(param) if states is not None else {}
    host = _to_host([value, *(v.clone() for v in sampled.values())])  # no view of the state
    return dataclasses.replace(
        fp,
        norm=math.sqrt(float(host[0])) if squared is not None else float(host[0]),
        states=dict(zip(sampled, host[1:], strict=True)) if states is not None else None,
    )


def _digest_of(sums: Any, sample_bits: Any, index_sum: Any | None) -> bytes:
    """The checksum a fingerprint keeps: a blake2b digest of the block sums' bytes and the
    sample's (numpy arrays: a row of a stacked piece is a contiguous view). With the sample
    in it, one comparison after ``step()`` covers both; the block sums alone miss an edit
    that keeps every block's bit-sum (``grad.data.neg_()`` on blocks of an even size)."""
    hashed = hashlib.blake2b(sums, digest_size=16)
    hashed.update(sample_bits)
    if index_sum is not None:
        hashed.update(index_sum)
    return hashed.digest()


def digest(fp: GradFingerprint) -> int:
    """A 63-bit digest of a grad's bits (its block checksums and sample): equal for equal
    grads, and for different grads all but surely different. What ranks compare to agree."""
    if not fp.present:
        return 0
    return int.from_bytes(fp.checksum[:8], "little") >> 1


def _per_element_state(optimizer: Any, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors of ``param``'s shape, by name (a DTensor's as its local
    shard: the elements the param's samples hold)."""
    state = optimizer.state.get(param, {}) if hasattr(optimizer, "state") else {}
    return {
        str(key): local(value)
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.shape == param.shape and value.numel() > 0
    }


def state_samples(optimizer: Any, param: torch.Tensor, *, full: bool = False) -> dict[str, Any]:
    """The optimizer's per-element state of ``param`` (tensors of its shape), sampled alike,
    copied (``full``: whole)."""
    return {
        key: value.detach().clone() if full else sample_of(value)
        for key, value in _per_element_state(optimizer, param).items()
    }


def state_tensors(optimizer: Any, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer's per-element state of ``param`` (tensors of its shape), by name, as
    they are: for a caller that samples many params' alike in one stack."""
    return _per_element_state(optimizer, param)


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
