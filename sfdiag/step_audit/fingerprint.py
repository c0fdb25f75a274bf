"""A grad's fingerprint at one moment, and the bit-level comparisons it rests on."""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass

import torch

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


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
