"""Cheap per-tensor fingerprints of ``p.grad``, taken just before and after ``step()``.

A fingerprint keeps a weak reference to the grad tensor (to tell "replaced" from
"changed in place" without holding memory), its L2 norm, integer checksums of its
bits (sums over blocks of elements, wrapping), its version counter and a small strided
sample of its elements (and of the parameter's). Detection never clones a whole
gradient by default: the extra memory is a few hundred elements per tensor.
``full=True`` (forensics) clones everything for exact per-element comparisons.

**Two reads per audited step.** Before ``step()`` every grad is read once for its norm
and its checksum together: on large tensors by one fused kernel per tensor
(``torch.compile``-d, where a compiler is present and the grads are large enough to pay
for compiling it), else by torch's own ops. After ``step()`` (``take(..., before=)``) a
grad that is the same tensor at the same version is read once, for its checksum only:
its norm is the pre-step one unless its bits changed (an edit through ``.data`` moves
no version counter; then, and only then, it is read again). A grad whose version moved
gets norm and checksum in one read, and its optimizer state sampled for fingerprinting.

**One transfer per snapshot.** Everything a snapshot brings to the host (norms,
checksums, samples) is computed on the device and, on an accelerator, packed into one
buffer and copied once; on the CPU there is nothing to copy. Comparisons then run on
the host copies. (Forensics clones and the rare ``.data`` case above cost more.)

Comparisons are on bits, so NaN equals NaN and a clean optimizer with NaN gradients is
never mistaken for a mutating one.
"""

from __future__ import annotations

import hashlib
import os
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sfdiag.dist import local

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
#: the fused kernel is compiled once the grads of one snapshot hold this many elements
#: (a compile takes seconds; ``SFDIAG_FUSED=1`` forces it, ``SFDIAG_FUSED=0`` turns it off)
FUSED_MIN_ELEMENTS = 16_000_000

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}

StateSampler = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True, slots=True)
class GradFingerprint:
    """One parameter's grad at one moment. ``ref is None`` means ``p.grad is None``.

    Samples live on the host (CPU tensors), whatever the grad's device.
    """

    ref: weakref.ref | None
    version: int
    norm: float
    # a 128-bit digest of the block bit-sums (and a sparse grad's index sum): equal for
    # equal grads, with 16 bytes held where the sums take hundreds
    checksum: bytes
    sample: torch.Tensor | None  # SAMPLE_SIZE strided elements (or all, for small tensors)
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
        # norm compared by bits: NaN == NaN here, and -0.0 vs 0.0 would count as a change.
        if float_bits(self.norm) != float_bits(other.norm) or self.checksum != other.checksum:
            return False
        if self.full is not None and other.full is not None:
            return _bits_equal(self.full, other.full)
        if self.sample is not None and other.sample is not None:
            return _bits_equal(self.sample, other.sample)
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


def sample_of(t: torch.Tensor) -> torch.Tensor:
    """SAMPLE_SIZE elements spread evenly over ``t`` (all of them when ``t`` is small), copied."""
    flat = _flat(t)
    n = flat.numel()
    if n <= SAMPLE_SIZE:
        return flat.detach().clone()
    return flat.detach()[:: n // SAMPLE_SIZE][:SAMPLE_SIZE].clone()


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """Per-block sums of the elements' bits, wrapping in their own integer type.

    Integer sums are exact in any order. Not ``sum(dtype=torch.int64)``: on CPU that first
    copies the whole tensor to int64 (twice a float32 grad's bytes, at every snapshot).
    Returns CHECKSUM_BLOCKS + 1 sums: the blocks, then the elements left over.
    """
    return _checksum_rows(_flat(t).unsqueeze(0))[0]


def _checksum_rows(rows: torch.Tensor) -> torch.Tensor:
    """``_checksum`` of each row of ``rows`` ([k, n], k tensors of one size)."""
    bits = _bits(rows)
    count, n = bits.shape
    per_block = n // CHECKSUM_BLOCKS
    split = per_block * CHECKSUM_BLOCKS
    blocks = bits[:, :split].reshape(count, CHECKSUM_BLOCKS, per_block).sum(dim=2, dtype=bits.dtype)
    rest = bits[:, split:].sum(dim=1, dtype=bits.dtype).reshape(count, 1)
    return torch.cat([blocks, rest], dim=1)


def _sample_rows(rows: torch.Tensor) -> torch.Tensor:
    """``sample_of`` each row of ``rows`` ([k, n]), in one copy."""
    n = rows.shape[1]
    if n <= SAMPLE_SIZE:
        return rows.clone()
    return rows[:, :: n // SAMPLE_SIZE][:, :SAMPLE_SIZE].clone()


#: small grads of one size are read together (a model's many biases and norms): one
#: stacked copy, then one op for all their checksums and one for their samples
SMALL_TENSOR = 65536


# ---- the fused read: norm and checksum in one pass ---------------------------------------------
#: tensors per call of the compiled kernel: a call costs tens of µs of Python, a tensor of a
#: large model a few hundred µs of reading; a short group is padded with a dummy
FUSED_GROUP = 8


def _fused_rows(*rows: torch.Tensor) -> list[torch.Tensor]:
    """For torch.compile: of each ``[n, FUSED_BLOCK]`` tensor, each row's sum of squares
    (accumulated in float64: as fast here, and exact to 1e-13 where float32 drifts to 1e-5
    over a million elements) and bit-sum, in one loop over its elements."""
    out = []
    for block in rows:
        bits = block.view(_INT_VIEW[block.element_size()])
        values = block.double()
        out += [(values * values).sum(dim=1), bits.sum(dim=1, dtype=bits.dtype)]
    return out


@dataclass
class _Fused:
    kernel: Any = None
    broken: str | None = None  # why the fused path is off for this process


_FUSED = _Fused()


def _fused_wanted(elements: int) -> bool:
    setting = os.environ.get("SFDIAG_FUSED", "auto").strip().lower()
    if setting in ("0", "off", "false", "no") or _FUSED.broken is not None:
        return False
    return setting in ("1", "on", "true", "yes") or elements >= FUSED_MIN_ELEMENTS


def _fused_eligible(view: torch.Tensor) -> bool:
    return (
        view.layout == torch.strided
        and view.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and view.is_contiguous()
        and view.numel() >= FUSED_MIN_ROWS * FUSED_BLOCK
    )


def _rows_and_tail(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = view.detach().reshape(-1)
    count = flat.numel() // FUSED_BLOCK
    return flat[: count * FUSED_BLOCK].view(count, FUSED_BLOCK), flat[count * FUSED_BLOCK :]


def _grouped(blocks: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The compiled kernel over ``blocks`` (``[n, FUSED_BLOCK]`` tensors of one dtype and
    device), ``FUSED_GROUP`` per call (a short group is padded); its outputs in order, or
    None where it cannot run (then torch's ops serve, for good: ``_FUSED.broken`` says
    why)."""
    if _FUSED.kernel is None:
        try:
            _FUSED.kernel = torch.compile(_fused_rows, dynamic=False, fullgraph=True)
        except Exception as exc:  # no torch.compile here
            _FUSED.broken = f"{type(exc).__name__}: {exc}"
            return None
    # two rows, not one: a dimension marked dynamic must not be 1
    pad = torch.zeros(2, FUSED_BLOCK, dtype=blocks[0].dtype, device=blocks[0].device)
    results: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(blocks), FUSED_GROUP):
                group = blocks[start : start + FUSED_GROUP]
                real = len(group)
                group = group + [pad] * (FUSED_GROUP - real)
                for rows in group:
                    torch._dynamo.mark_dynamic(rows, 0)
                results += _FUSED.kernel(*group)[: 2 * real]
    except Exception as exc:  # no C++ compiler, no triton, ...: torch's ops from now on
        _FUSED.broken = f"{type(exc).__name__}: {exc}"
        return None
    return results


def _with_tail(sums: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    tail_bits = _bits(tail)
    last = tail_bits.sum(dtype=tail_bits.dtype).reshape(1) if tail.numel() else sums.new_zeros(1)
    return torch.cat([sums, last]).to(torch.int64)


def _fused_reads(views: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(norm as a 0-d float64 tensor, block checksums as int64) of each of ``views`` (all
    of one dtype and device), read once each by the compiled kernel; None where it cannot
    run."""
    split = [_rows_and_tail(v) for v in views]
    results = _grouped([rows for rows, _ in split])
    if results is None:
        return None
    out = []
    for k, (_, tail) in enumerate(split):
        squares, sums = results[2 * k], results[2 * k + 1]
        total = squares.sum()
        if tail.numel():
            tail_values = tail.double()
            total = total + (tail_values * tail_values).sum()
        out.append((total.sqrt(), _with_tail(sums, tail)))
    return out


# ---- one transfer to the host ---------------------------------------------------------------
def _to_host(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """``pieces`` on the CPU: as they are when they already live there; else ``pack``-ed."""
    if not pieces or all(p.device.type == "cpu" for p in pieces):
        return pieces
    return pack(pieces)


def pack(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """``pieces`` packed into one byte buffer on their device, copied to the host in one
    transfer, and cut back into tensors of their dtypes and shapes."""
    device = pieces[0].device
    flat = [p.detach().to(device).contiguous().reshape(-1) for p in pieces]
    packed = torch.cat([p.view(torch.uint8) for p in flat]).cpu()
    out, start = [], 0
    for p, original in zip(flat, pieces, strict=True):
        size = p.numel() * p.element_size()
        out.append(packed[start : start + size].view(p.dtype).view(original.shape))
        start += size
    return out


@dataclass
class _Pending:
    """What one snapshot asks of the device, by position in one list (then one transfer)."""

    pieces: list[torch.Tensor] = field(default_factory=list)

    def add(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        self.pieces.append(t)
        return len(self.pieces) - 1


def take(
    params: list[torch.Tensor],
    *,
    full: bool = False,
    param_samples: bool = True,
    before: list[GradFingerprint] | None = None,
    states: StateSampler | None = None,
) -> list[GradFingerprint]:
    """Fingerprint every parameter's ``.grad`` (see the module doc).

    ``before``: the pre-step snapshot of the same ``params``; a grad that is still that
    tensor at that version is read for its checksum only. ``states(param)``: the
    optimizer's per-element state of a param, sampled where its grad's version moved.
    ``param_samples=False`` leaves out the parameters' samples: the auditor reads them
    from the snapshot before ``step()`` only.
    """
    grads = [p.grad for p in params]
    views: dict[int, torch.Tensor] = {
        i: _dense_view(g) for i, g in enumerate(grads) if g is not None
    }
    unchanged = {
        i
        for i, g in enumerate(grads)
        if g is not None
        and before is not None
        and before[i].present
        and before[i].ref() is g
        and before[i].version == g._version
    }
    pending = _Pending()
    norm_at: dict[int, int] = {}
    sums_at: dict[int, int] = {}
    layouts: dict[int, str] = {}
    eligible = [i for i, v in views.items() if _fused_eligible(v)]
    use_fused = bool(eligible) and _fused_wanted(sum(views[i].numel() for i in eligible))
    plain_norms = []
    for i in views:
        # a tensor keeps its checksum's layout from before step() to after, whatever happens
        prior = before[i] if before is not None and before[i].present else None
        if prior is not None:
            layouts[i] = prior.layout
        else:
            layouts[i] = "fused" if use_fused and i in eligible else "blocks"
    by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, layout in layouts.items():
        if layout == "fused" and i not in unchanged:
            by_dtype.setdefault((views[i].dtype, views[i].device), []).append(i)
    for indices in by_dtype.values():
        read = _fused_reads([views[i] for i in indices])
        for i, (norm, sums) in zip(indices, read or (), strict=False):
            norm_at[i] = pending.add(norm)  # norm and checksum in one read
            sums_at[i] = pending.add(sums)
    sample_at: dict[int, int] = {}
    same_size: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
    for i, view in views.items():
        if (
            i not in sums_at
            and layouts[i] == "blocks"
            and view.layout == torch.strided
            and view.numel() <= SMALL_TENSOR
        ):
            same_size.setdefault((view.numel(), view.dtype, view.device), []).append(i)
    for indices in same_size.values():
        if len(indices) < 2:
            continue
        stacked = torch.stack([views[i].detach().reshape(-1) for i in indices])
        checksums, samples = _checksum_rows(stacked), _sample_rows(stacked)
        for i, sums, sample in zip(indices, checksums, samples, strict=True):
            sums_at[i] = pending.add(sums)
            sample_at[i] = pending.add(sample)
            if i not in unchanged:
                plain_norms.append(i)
    for i, view in views.items():
        if i in sums_at:
            continue
        if layouts[i] == "fused":
            sums = _fused_sums_only(view)
        else:
            sums = _checksum(view)
        if i not in unchanged:
            plain_norms.append(i)
        sums_at[i] = pending.add(sums)
    if plain_norms:
        # one kernel per (device, dtype) group; the stack widens mixed dtypes exactly
        norms = torch._foreach_norm([views[i].detach() for i in plain_norms])
        for i, norm in zip(plain_norms, norms, strict=True):
            norm_at[i] = pending.add(norm.to(torch.float64))
    index_at = {
        i: pending.add(g._indices().sum().reshape(1).to(torch.int64))
        for i, g in enumerate(grads)
        if g is not None and g.layout == torch.sparse_coo
    }
    sample_at.update({i: pending.add(sample_of(v)) for i, v in views.items() if i not in sample_at})
    param_at = {
        i: pending.add(sample_of(local(params[i])))
        for i, g in enumerate(grads)
        if g is not None and param_samples and g.layout == torch.strided
    }
    state_at: dict[int, dict[str, int]] = {}
    if states is not None:
        for i in views:
            if i not in unchanged:
                state_at[i] = {k: pending.add(v) for k, v in states(params[i]).items()}
    host = _to_host(pending.pieces)

    out: list[GradFingerprint] = []
    recheck: list[int] = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if g is None:
            out.append(GradFingerprint(None, 0, 0.0, b"", None, None))
            continue
        checksum = _digest_of(host[sums_at[i]], host[index_at[i]] if i in index_at else None)
        if i in norm_at:
            norm = float(host[norm_at[i]])
        else:  # the same tensor at the same version: the pre-step norm, if the bits agree
            norm = before[i].norm
            if checksum != before[i].checksum:
                recheck.append(i)  # changed behind the version counter (.data): read it
        out.append(
            GradFingerprint(
                ref=weakref.ref(g),
                version=g._version,
                norm=norm,
                checksum=checksum,
                sample=host[sample_at[i]],
                param_sample=host[param_at[i]] if i in param_at else None,
                full=views[i].detach().clone() if full else None,
                full_param=(
                    local(p).detach().clone()
                    if full and param_samples and g.layout == torch.strided
                    else None
                ),
                states={k: host[j] for k, j in state_at[i].items()} if i in state_at else None,
                layout=layouts[i],
            )
        )
    for i in recheck:
        out[i] = _reread(out[i], views[i], params[i], states)
    return out


def _fused_sums_only(view: torch.Tensor) -> torch.Tensor:
    """The fused kernel's block checksums of ``view``, by torch's ops (one read; for a grad
    whose norm is known, or where the kernel cannot run)."""
    rows, tail = _rows_and_tail(view)
    bits, tail_bits = _bits(rows), _bits(tail)
    head = bits.sum(dim=1, dtype=bits.dtype)
    return torch.cat([head, tail_bits.sum(dtype=tail_bits.dtype).reshape(1)]).to(torch.int64)


def _reread(
    fp: GradFingerprint, view: torch.Tensor, param: torch.Tensor, states: StateSampler | None
) -> GradFingerprint:
    """A grad whose bits changed behind its version counter: its norm and state, read now."""
    norm = torch._foreach_norm([view.detach()])[0].to(torch.float64)
    sampled = states(param) if states is not None else {}
    host = _to_host([norm, *sampled.values()])
    return GradFingerprint(
        ref=fp.ref,
        version=fp.version,
        norm=float(host[0]),
        checksum=fp.checksum,
        sample=fp.sample,
        param_sample=fp.param_sample,
        full=fp.full,
        full_param=fp.full_param,
        states=dict(zip(sampled, host[1:], strict=True)) if states is not None else None,
        layout=fp.layout,
    )


def _digest_of(sums: torch.Tensor, index_sum: torch.Tensor | None) -> bytes:
    """The checksum a fingerprint keeps: a blake2b digest of the block sums' bytes."""
    hashed = hashlib.blake2b(sums.numpy().tobytes(), digest_size=16)
    if index_sum is not None:
        hashed.update(index_sum.numpy().tobytes())
    return hashed.digest()


def digest(fp: GradFingerprint) -> int:
    """A 63-bit digest of a grad's bits (its block checksums): equal for equal grads, and
    for different grads all but surely different. What ranks compare to agree."""
    if not fp.present:
        return 0
    return int.from_bytes(fp.checksum[:8], "little") >> 1


def state_samples(optimizer: Any, param: torch.Tensor, *, full: bool = False) -> dict[str, Any]:
    """The optimizer's per-element state of ``param`` (tensors of its shape), sampled alike
    (on the state's device: ``take`` brings them to the host with the rest)."""
    state = optimizer.state.get(param, {}) if hasattr(optimizer, "state") else {}
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == param.shape and value.numel() > 0:
            value = local(value)  # a DTensor's shard: the elements the param's samples hold
            out[str(key)] = value.detach().clone() if full else sample_of(value)
    return out


def state_bytes(optimizer: Any) -> int:
    """Bytes held in the optimizer's state tensors."""
    total = 0
    for per_param in getattr(optimizer, "state", {}).values():
        for value in per_param.values() if isinstance(per_param, dict) else ():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
