"""Cheap per-tensor fingerprints of ``p.grad``, taken just before and after ``step()``.

A fingerprint keeps a weak reference to the grad tensor (to tell "replaced"
from "changed in place" without holding memory), its L2 norm, an integer
checksum of its bits, its version counter and a small strided sample of its
elements (and of the parameter's). Detection never clones a whole gradient by
default: the extra memory is a few hundred elements per tensor. ``full=True``
(forensics) clones everything for exact per-element comparisons.

Comparisons are on bits, so NaN equals NaN and a clean optimizer with NaN
gradients is never mistaken for a mutating one.
"""

from __future__ import annotations

import hashlib
import struct
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from sfdiag.dist import local

#: elements sampled per tensor for fingerprinting the kind of a mutation
SAMPLE_SIZE = 256

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


@dataclass(frozen=True)
class GradFingerprint:
    """One parameter's grad at one moment. ``ref is None`` means ``p.grad is None``."""

    ref: weakref.ref | None
    version: int
    norm: float
    checksum: tuple[bytes, int] | tuple[()]  # per-block bit-sums (int64 bytes), sparse index sum
    sample: torch.Tensor | None  # SAMPLE_SIZE strided elements (or all, for small tensors)
    param_sample: torch.Tensor | None  # the parameter at the same elements
    full: torch.Tensor | None = None  # forensics: a full clone
    full_param: torch.Tensor | None = None

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


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def sample_of(t: torch.Tensor) -> torch.Tensor:
    """SAMPLE_SIZE elements spread evenly over ``t`` (all of them when ``t`` is small), copied."""
    flat = _flat(t)
    n = flat.numel()
    if n <= SAMPLE_SIZE:
        return flat.detach().clone()
    return flat.detach()[:: n // SAMPLE_SIZE][:SAMPLE_SIZE].clone()


#: the checksum sums the bits of this many consecutive blocks separately, in the same one
#: read: an edit that cancels out in a whole-tensor sum (two sign flips, a swap) is caught
#: unless both elements fall in the same block.
CHECKSUM_BLOCKS = 64


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """Per-block sums of the elements' bits, wrapping in their own integer type.

    Integer sums are exact in any order. Not ``sum(dtype=torch.int64)``: on CPU that first
    copies the whole tensor to int64 (twice a float32 grad's bytes, at every snapshot).
    Returns CHECKSUM_BLOCKS + 1 sums: the blocks, then the elements left over.
    """
    bits = _bits(_flat(t))
    per_block = bits.numel() // CHECKSUM_BLOCKS
    split = per_block * CHECKSUM_BLOCKS
    blocks = bits[:split].view(CHECKSUM_BLOCKS, per_block).sum(dim=1, dtype=bits.dtype)
    rest = bits[split:].sum(dtype=bits.dtype).reshape(1)
    return torch.cat([blocks, rest])


def take(
    params: list[torch.Tensor], *, full: bool = False, param_samples: bool = True
) -> list[GradFingerprint]:
    """Fingerprint every parameter's ``.grad``: norms in one fused call, one sync for all.

    ``param_samples=False`` leaves out the parameters' samples (``param_sample`` and
    ``full_param`` are None): the auditor reads them only from the snapshot before ``step()``.
    """
    grads = [p.grad for p in params]
    present = [(i, _dense_view(g)) for i, g in enumerate(grads) if g is not None]
    scalars: list[float] = []
    sums: list[bytes] = []
    if present:
        views = [v for _, v in present]
        # Norms in float64 for every dtype; _foreach_norm batches them in one kernel per group.
        norms = torch._foreach_norm([v.detach() for v in views])
        norm_vals = torch.stack(norms).tolist()  # stack widens mixed dtypes exactly
        # The block sums as bytes, not Python ints: 65 ints per grad and snapshot would hold
        # more memory than all the samples together (int64: the same whatever else is stacked).
        rows = torch.stack([_checksum(v) for v in views])
        if not (rows.is_floating_point() or rows.is_complex()):
            rows = rows.to(torch.int64)
        scalars, sums = norm_vals, [row.tobytes() for row in rows.cpu().numpy()]
    out: list[GradFingerprint] = []
    by_index = {i: k for k, (i, _) in enumerate(present)}
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if g is None:
            out.append(GradFingerprint(None, 0, 0.0, (), None, None))
            continue
        k = by_index[i]
        view = present[k][1]
        sparse = g.layout != torch.strided
        out.append(
            GradFingerprint(
                ref=weakref.ref(g),
                version=g._version,
                norm=float(scalars[k]),
                checksum=(sums[k], _index_checksum(g) if sparse else 0),
                sample=sample_of(view),
                param_sample=None if sparse or not param_samples else sample_of(local(p)),
                full=view.detach().clone() if full else None,
                full_param=(
                    local(p).detach().clone() if full and param_samples and not sparse else None
                ),
            )
        )
    return out


def digest(fp: GradFingerprint) -> int:
    """A 63-bit digest of a grad's bits (its block checksums): equal for equal grads, and
    for different grads all but surely different. What ranks compare to agree."""
    if not fp.present:
        return 0
    data = b"".join(part if isinstance(part, bytes) else str(part).encode() for part in fp.checksum)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def _index_checksum(g: torch.Tensor) -> int:
    return int(g._indices().sum()) if g.layout == torch.sparse_coo else 0


def state_samples(optimizer: Any, param: torch.Tensor, *, full: bool = False) -> dict[str, Any]:
    """The optimizer's per-element state of ``param`` (tensors of its shape), sampled alike."""
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
