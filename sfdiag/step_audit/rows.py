"""A snapshot as the auditor reads it: per-grad results kept as the rows of arrays.

Small grads of one shape, dtype and device (a model's many biases, norms, small layers)
are read together (``snapshot.take``): one stack, one op for all their checksums, one for
their samples, one kernel call for their norms. Their results stay so, as the rows of a
``GroupRows``: compared with the snapshot before ``step()`` array against array, hashed
for the ranks' comparison in one pass, and turned into a ``GradFingerprint`` (an object, a
digest) only for a grad something asks about, which on a clean step is none of them. On
a model of many tiny tensors that per-grad Python was most of what an audited step paid.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import torch

from sfdiag.step_audit.fingerprint import GradFingerprint, float_bits


@dataclass(slots=True)
class GroupRows:
    """The results of one group of small grads read together, as rows (one per grad, in
    the order of ``indices``): the grads themselves and their versions, their block
    bit-sums and their samples' bits (numpy), the samples themselves (on the host) and
    their norms."""

    indices: tuple[int, ...]
    # held, not weakly: a snapshot lives from one step hook to the next (before ``step()``
    # to after it), and a weak reference a grad is an object the collector tracks, which
    # the step's own collections would carry into its oldest generation by the thousand.
    # (While ``p.grad`` holds them this costs nothing; a grad an optimizer frees or
    # replaces inside ``step()`` is kept until the hook after it.)
    grads: list[Any]
    versions: list[int]
    sums: Any  # numpy [k, blocks]
    bits: Any  # numpy [k, sample length]
    samples: torch.Tensor  # [k, sample length]
    norms: list[float]
    # the params' samples, as rows (None: not read), and which grads' params were asked for
    param_samples: torch.Tensor | None = None
    params_sampled: frozenset[int] = frozenset()
    # the optimizer's state sampled with the grads (an accelerator's), by name, as rows
    states: dict[str, torch.Tensor] | None = None
    key: tuple[Any, ...] | None = None  # the grads' shape, dtype and device

    def same_rows(self, other: GroupRows) -> Any:
        """Which rows read bit for bit as the other's (norm, block sums, sample: numpy bool
        [k]); None where the two groups' arrays differ in shape."""
        if self.sums.shape != other.sums.shape or self.bits.shape != other.bits.shape:
            return None
        return (
            (_norm_bits(self.norms) == _norm_bits(other.norms))
            & (self.sums == other.sums).all(axis=1)
            & (self.bits == other.bits).all(axis=1)
        )

    def same_row(self, row: int, other: GroupRows, other_row: int) -> bool:
        """``same_rows`` of one row against a row of another group."""
        return (
            float_bits(self.norms[row]) == float_bits(other.norms[other_row])
            and np.array_equal(self.sums[row], other.sums[other_row])
            and np.array_equal(self.bits[row], other.bits[other_row])
        )


def _norm_bits(norms: list[float]) -> Any:
    """The norms' bits (NaN equals NaN, -0.0 is not 0.0), as numpy int64."""
    return np.array(norms, dtype=np.float64).view(np.int64)


#: a row's digest is a sum, wrapping in 64 bits, of its words times these odd numbers (one
#: table per kind of result): equal rows give equal digests, different ones all but
#: surely different (any one word's change moves it), in a few numpy ops for all rows
_MULTIPLIERS: dict[int, Any] = {}


def _multipliers(part: int, length: int) -> Any:
    table = _MULTIPLIERS.get(part)
    if table is None or len(table) < length:
        size = max(length, 512)
        rng = np.random.default_rng(0x5FD1A6 + part)
        table = _MULTIPLIERS[part] = rng.integers(0, 2**63, size, dtype=np.uint64) * 2 + 1
    return table[:length]


def row_digests(*parts: Any) -> list[int]:
    """A 63-bit digest of each row of ``parts`` (integer numpy arrays [k, n], one per kind of
    result, or None): what ranks compare to agree that their grads are bit for bit alike."""
    parts = tuple(p for p in parts if p is not None)
    digest = np.zeros(len(parts[0]), dtype=np.uint64)
    for number, part in enumerate(parts):
        # each row's bytes as 64-bit words (zero-padded): the same row gives the same words
        # whatever it is read with, and no conversion copies the array
        raw = np.ascontiguousarray(part).reshape(len(part), -1).view(np.uint8)
        if raw.shape[1] % 8:
            raw = np.pad(raw, ((0, 0), (0, -raw.shape[1] % 8)))
        words = raw.view(np.uint64)
        digest += (words * _multipliers(number, words.shape[1])).sum(axis=1, dtype=np.uint64)
    return (digest >> np.uint64(1)).astype(np.int64).tolist()


_NONE: frozenset[int] = frozenset()

#: a grad a fingerprint saw that has been freed since: present then, and no tensor now
GONE = object()


def _held(fp: GradFingerprint) -> Any:
    """The grad ``fp`` saw: the tensor (None where there was none; ``GONE`` where it was
    freed since)."""
    if fp.ref is None:
        return None
    grad = fp.ref()
    return GONE if grad is None else grad


class Snapshot(Sequence):
    """The fingerprints ``snapshot.take`` read, one per parameter, built on demand: a grad
    of a group (``groups``) is a row of its arrays until something asks for its
    ``GradFingerprint``; ``kept`` (after ``step()``) are the grads still bit for bit what
    ``before`` read, whose fingerprint is before's. The auditor's hot path reads the rows
    (``norms``, ``identities``, ``digests``, ``sample``) and never builds the objects."""

    __slots__ = (  # a step hook's memory counts: no instance dict
        "_prints",
        "groups",
        "kept",
        "_before",
        "_build",
        "_digests",
        "_states",
        "_row",
        "_identities",
        "_norms",
    )

    def __init__(
        self,
        prints: list[GradFingerprint | None],
        groups: dict[tuple[int, ...], GroupRows],
        *,
        kept: set[int] | None = None,
        before: Snapshot | None = None,
        build: Callable[[int, GroupRows, int], GradFingerprint] | None = None,
        digests: list[int] | None = None,
        states: Callable[[int], dict[str, torch.Tensor] | None] | None = None,
    ) -> None:
        self._prints = prints
        self.groups = groups
        self.kept = kept or _NONE
        self._before = before
        self._build = build
        self._digests = digests
        self._states = states  # a grouped grad's state samples
        self._row: dict[int, tuple[GroupRows, int]] | None = None  # (built when first asked)
        self._identities: tuple[list[Any], list[int], list[str]] | None = None
        self._norms: list[float | None] | None = None

    def __len__(self) -> int:
        return len(self._prints)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        fp = self._prints[index]
        if fp is None:
            if index in self.kept:
                fp = self._before[index]
            else:
                group, row = self._rows()[index]
                fp = self._build(index, group, row)
            self._prints[index] = fp
        return fp

    def __iter__(self) -> Iterator[GradFingerprint]:
        return (self[i] for i in range(len(self)))

    def row(self, index: int) -> tuple[GroupRows, int] | None:
        """The group and row of grad ``index``, where it was read with a group and nothing
        built its fingerprint yet."""
        return self._rows().get(index) if self._prints[index] is None else None

    def built(self) -> set[int]:
        """The grads whose ``GradFingerprint`` was built: no longer read as rows."""
        if not any(map(operator.is_not, self._prints, repeat(None))):  # (as a rule: none)
            return set()
        return {i for i, fp in enumerate(self._prints) if fp is not None}

    def _rows(self) -> dict[int, tuple[GroupRows, int]]:
        if self._row is None:
            self._row = {
                i: (group, k) for group in self.groups.values() for k, i in enumerate(group.indices)
            }
        return self._row

    def identities(self) -> tuple[list[Any], list[int], list[str]]:
        """Each grad (None: no grad; ``GONE``: one freed since), version and checksum layout,
        without building fingerprints (read once: a fingerprint built later says the same)."""
        if self._identities is None:
            self._identities = self._read_identities()
        return self._identities

    def _read_identities(self) -> tuple[list[Any], list[int], list[str]]:
        if self.kept:
            held, versions, layouts = (list(x) for x in self._before.identities())
        else:
            held, versions, layouts = [None] * len(self), [0] * len(self), ["blocks"] * len(self)
        built = self.built()
        for i in sorted(built):
            fp = self._prints[i]
            held[i], versions[i], layouts[i] = _held(fp), fp.version, fp.layout
        skip = built | self.kept
        return (
            self._with_rows(held, "grads", skip),
            self._with_rows(versions, "versions", skip),
            layouts,
        )

    def _with_rows(self, values: list[Any], name: str, skip: Collection[int]) -> list[Any]:
        """``values`` where each grad still read as a group's row (not in ``skip``: built or
        kept) holds its group's ``name`` (grads, versions, norms): a dict of them and one
        ``map``, not a test a grad."""
        rows: dict[int, Any] = {}
        for group in self.groups.values():
            rows.update(zip(group.indices, getattr(group, name), strict=True))
        if not rows:
            return values
        for i in rows.keys() & skip:
            del rows[i]
        return list(map(rows.get, range(len(values)), values))

    def norms(self) -> list[float | None]:
        """Each grad's norm (None: no grad), without building fingerprints (read once)."""
        if self._norms is None:
            self._norms = self._read_norms()
        return self._norms

    def _read_norms(self) -> list[float | None]:
        out: list[float | None] = [None] * len(self)
        built = self.built()
        for i in built:
            fp = self._prints[i]
            out[i] = fp.norm if fp.present else None
        if self.kept:
            before = self._before.norms()
            for i in self.kept:
                if self._prints[i] is None:
                    out[i] = before[i]
        return self._with_rows(out, "norms", built | self.kept)

    def all_finite(self) -> bool:
        norms = self.norms()
        if None in norms:  # (a param without a grad)
            norms = [n for n in norms if n is not None]
        return all(map(math.isfinite, norms))

    def digests(self) -> tuple[int, ...]:
        """Each grad's 63-bit digest (0: none): equal for bit-identical grads, wherever they
        were read (the ranks of one job compare them); () where ``take`` was not asked for
        them."""
        if self._digests is None:  # not asked of this snapshot: none to compare
            return ()
        return tuple(self._digests)

    def sample(self, index: int) -> torch.Tensor | None:
        """Grad ``index``'s sample (on the host), without building its fingerprint."""
        found = self.row(index)
        if found is not None:
            group, row = found
            return group.samples[row]
        return self[index].sample

    def param_sample(self, index: int) -> torch.Tensor | None:
        """The sample of grad ``index``'s parameter, without building its fingerprint."""
        found = self.row(index)
        if found is not None:
            group, row = found
            if index not in group.params_sampled or group.param_samples is None:
                return None
            return group.param_samples[row]
        return self[index].param_sample

    def states(self, index: int) -> dict[str, torch.Tensor] | None:
        """The optimizer's state sampled with grad ``index`` (None: not sampled)."""
        found = self.row(index)
        if found is not None:
            group, row = found
            if group.states is not None:
                return {name: rows[row] for name, rows in group.states.items()}
            return self._states(index) if self._states is not None else None
        return self[index].states

    def same_content(self, index: int, other: Snapshot) -> bool:
        """Whether grad ``index`` reads bit for bit alike here and in ``other`` (its norm,
        block sums and sample), from the rows where both have them."""
        mine, theirs = self.row(index), other.row(index)
        if mine is not None and theirs is not None:
            return mine[0].same_row(mine[1], *theirs)
        return self[index].same_content(other[index])
