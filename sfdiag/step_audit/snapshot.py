"""Cheap per-tensor fingerprints of ``p.grad``, taken just before and after ``step()``.

A fingerprint keeps a weak reference to the grad tensor (to tell "replaced" from
"changed in place" without holding memory; a group's rows hold their grads themselves, for
the snapshot's life from the hook before ``step()`` to the one after it: a weak reference a
grad is an object the collector tracks, and the step's own collections would carry
thousands of them into its oldest generation each step), its L2 norm, integer checksums of its
bits (sums over blocks of elements, wrapping), its version counter and a small strided
sample of its elements (and of the parameter's). Detection never clones a whole
gradient by default: the extra memory is a few hundred elements per tensor.
``full=True`` (forensics) clones everything for exact per-element comparisons.

**Two reads per audited step.** Before ``step()`` every grad is read once for its norm
and its checksum together: on the CPU's large tensors by one call of a small C kernel for
all of them (``sfdiag.step_audit.fused``: compiled once per machine where a C compiler is
present, and used where the grads are large enough to pay for it; the samples, its param's
too, in the same pass), else by torch's own ops (on a GPU always: there the host's time per
launch is what counts). After
``step()`` (``take(..., before=)``) a grad that is the same tensor at the same version is
read once, for its checksum, and sampled (the sample's bits are hashed into the checksum;
the kernel again where it read the grad before): where the
checksum agrees with before, its fingerprint *is* the one from before (nothing else is built
for it); where the bits changed (an edit through ``.data`` moves no version counter) its
norm is read again. A grad whose version moved gets norm and checksum in one read, and its
optimizer state sampled for fingerprinting.

**Per tensor, a few ops; per group, none.** Everything runs under ``no_grad``, so no view
needs a detach (on a GPU each torch call costs the host µs; ``tests/test_snapshot.py``
counts them). Small grads of one shape, dtype and device are read as a group: one stack,
one op for all their checksums, one for their samples, one kernel call (or foreach norm)
for their norms, one stack for their params' samples and one per state name; their
results stay the rows of arrays (``rows.GroupRows``), compared with the snapshot before
``step()`` array against array, and a ``GradFingerprint`` is built for one of them only
when something asks for it (``rows.Snapshot``): on a clean step, for none. The torch
calls of a snapshot do not grow with the number of grads in a group. Other grads'
samples are views copied in one stack per dtype and length; the fused kernel reads all
large grads in one call.

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
import operator
import os
import weakref
from collections.abc import Callable, Collection
from itertools import compress
from typing import Any

import torch

from sfdiag.dist import local
from sfdiag.step_audit import fused
from sfdiag.step_audit.fingerprint import (  # noqa: F401 (re-exported)
    _INT_VIEW,
    GradFingerprint,
    _bits,
    _bits_equal,
    float_bits,
)
from sfdiag.step_audit.grouping import (  # noqa: F401 (stacked_rows re-exported)
    GroupKey,
    groups_again,
    small_groups,
    stacked_params,
    stacked_rows,
)
from sfdiag.step_audit.rows import GroupRows, Snapshot, row_digests
from sfdiag.step_audit.sampling import (  # noqa: F401 (re-exported)
    SAMPLE_SIZE,
    _flat,
    _sample_rows,
    _sample_view,
    sample_of,
    sample_positions,
    sample_view,
)
from sfdiag.step_audit.state import (  # noqa: F401 (re-exported)
    state_bytes,
    state_rows,
    state_samples,
    state_tensors,
    state_views,
    states_alike,
)
from sfdiag.step_audit.transfer import (  # noqa: F401 (pack: re-exported)
    PACK_ALIGN,
    _Pending,
    _stacked,
    pack,
)

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


#: a param -> its optimizer state's sampled elements, by name (views will do: ``take``
#: copies them with the rest; ``state_views`` is one)
StateSampler = Callable[[torch.Tensor], dict[str, torch.Tensor]]


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
    large = FUSED_MIN_ROWS * FUSED_BLOCK  # (first, in the comprehension: most grads are smaller)
    eligible = {i for i, v in views.items() if v.numel() >= large and _fused_eligible(v)}
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


def _stacked_samples(views: dict[int, torch.Tensor], pending: _Pending) -> dict[int, int]:
    """A sample of each of ``views``: one copy per dtype, device and sample length."""
    return _stacked({i: _sample_view(v) for i, v in views.items()}, pending, views=True)


def _layouts(views: dict[int, torch.Tensor], before: Snapshot | None) -> dict[int, str]:
    """Each grad's checksum layout: kept from before ``step()`` to after, whatever happens;
    "fused" (rows of FUSED_BLOCK elements) for the grads ``_fused_grads`` picks, "blocks"
    for the others."""
    kept = {}
    if before is not None:
        then, _, layouts = before.identities()
        kept = {i: layouts[i] for i in views if then[i] is not None}
    if len(kept) == len(views):  # after step(), as a rule: nothing to decide
        return kept
    fused = _fused_grads(views)
    if not kept and not fused:  # before step(), on a model of small grads
        return dict.fromkeys(views, "blocks")
    return {i: kept.get(i) or ("fused" if i in fused else "blocks") for i in views}


def _unchanged(
    grads: list[torch.Tensor | None], versions: list[int], before: Snapshot | None
) -> set[int]:
    """The grads that are still the tensors ``before`` saw, at the versions it saw
    (``versions``: the grads' now; compared in C's loops, not a Python step a grad)."""
    if before is None:
        return set()
    then, then_versions, _ = before.identities()
    same = map(
        operator.and_, map(operator.is_, then, grads), map(operator.eq, then_versions, versions)
    )
    return {i for i in compress(range(len(grads)), same) if grads[i] is not None}


@torch.no_grad()  # the hooks run with grad on, and a create_graph=True grad has a graph
def take(
    params: list[torch.Tensor],
    *,
    full: bool = False,
    param_samples: bool | Collection[int] = True,
    before: Snapshot | None = None,
    states: StateSampler | None = None,
    states_of_group: Callable[[list[torch.Tensor]], dict[str, torch.Tensor] | None] | None = None,
    digests: bool = True,
) -> Snapshot:
    """Fingerprint every parameter's ``.grad`` (see the module doc).

    ``before``: the pre-step snapshot of the same ``params``; a grad that is still that
    tensor at that version is read for its checksum and sampled, not for its norm, and
    where its checksum (which covers the sample) agrees its fingerprint is the one from
    before (``Snapshot.kept``). ``states(param)``: the optimizer's per-element state of a
    param, sampled where its grad's version moved; ``states_of_group(params)``: the same for a
    group's params at once, as rows (None where it cannot: then ``states`` each).
    ``digests``: the snapshot before ``step()`` hashes every grad for the ranks of a job to
    compare (``Snapshot.digests``).
    ``param_samples``: which parameters are sampled too (True: all, False: none, else their
    indices in ``params``); the auditor reads them from the snapshot before ``step()`` only,
    where a grad mutated.
    Small grads of one shape are read as groups (``rows.GroupRows``): their fingerprints are
    built only when asked for (``Snapshot[i]``).
    """
    if before is not None and not isinstance(before, Snapshot):  # fingerprints, as a list
        before = Snapshot(list(before), {})
    # (each grad and its version in one C call; the versions do not move while it reads)
    grads, grad_versions, whole = fused.grads_of(params)
    sample_params = set(range(len(params))) if param_samples is True else set(param_samples or ())
    # under no_grad: no view or copy taken here needs a detach (one host call a tensor saved)
    # a plain dense grad is its own view (most are: no call a grad); the others (a sparse
    # grad, a DTensor, a subclass) are read through one
    strided, plain = torch.strided, torch.Tensor
    if whole and fused.all_strided(grads):  # as a rule: every grad present, plain, dense
        views, irregular = dict(enumerate(grads)), []
    else:
        views = {i: g for i, g in enumerate(grads) if type(g) is plain and g.layout == strided}
        irregular = [i for i, g in enumerate(grads) if g is not None and i not in views]
    if irregular:  # (in the grads' order, as the plain ones)
        views.update((i, _dense_view(grads[i])) for i in irregular)
        views = dict(sorted(views.items()))
    unchanged = _unchanged(grads, grad_versions, before)
    layouts = _layouts(views, before)
    pending = _Pending()
    sample_at: dict[int, int] = {}

    # the fused layout's grads on the CPU: one call of the kernel per dtype reads them all
    # for their checksums and samples, and where the version moved for their norms too
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in [i for i, layout in layouts.items() if layout == "fused"]:
        if _kernel_reads(views[i]):
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

    # the grads whose norms are read below, in as few calls as their kinds allow: a group's
    # (one shape, dtype, device) together, the others each as it comes
    group_needs: list[list[int]] = []
    needs_norm: list[int] = []
    same_shape: list[tuple[GroupKey, list[int]]] = []
    if not full:  # (forensics clones every grad: one at a time)
        if before is not None:  # after step(): before's groups, where they stay groups
            same_shape = groups_again(before, grads)
        regrouped = {i for _, indices in same_shape for i in indices}
        not_strided = {i for i in irregular if views[i].layout != torch.strided}
        same_shape.extend(
            small_groups(
                views,
                [
                    i
                    for i in (sorted(views.keys() - regrouped) if regrouped else views)
                    if i not in not_strided and layouts[i] == "blocks" and i not in sums_at
                ],
                SMALL_TENSOR,
            )
        )
    # indices -> the pieces of their block sums, samples and params' samples (None: none)
    group_at: dict[tuple[int, ...], tuple[GroupKey, int, int, int | None]] = {}
    grouped: set[int] = set()
    stacked_norms: list[tuple[list[int], int]] = []  # as ``_read_norms``' pieces
    params_grouped: set[int] = set()  # grads whose params are sampled with their group's
    for key, indices in same_shape:
        # one stack of the grads as they are (one shape: no view a grad), then rows
        stacked = stacked_rows([views[i] for i in indices], key[0])
        if stacked is None or stacked.device != key[2]:
            continue  # a group kept from before whose shapes or devices moved since: alone
        sums_slot = pending.add(_checksum_rows(stacked))
        samples_slot = pending.add(_sample_rows(stacked, owned=True))  # (read only below)
        params_slot = None
        if any(i in sample_params for i in indices):
            param_rows = stacked_params(params, indices)
            if param_rows is not None:
                params_slot = pending.add(_sample_rows(param_rows, owned=True))
                params_grouped.update(indices)
        group_at[tuple(indices)] = (key, sums_slot, samples_slot, params_slot)
        grouped.update(indices)
        needs = [i for i in indices if i not in unchanged] if unchanged else indices
        # every norm of a small CPU group from its stack's rows: the bits the kernel reads
        # from each grad, without a pointer gathered a grad (else as ``_read_norms`` reads)
        squares = (
            fused.row_squares(stacked, [views[i] for i in indices])
            if len(needs) == len(indices)
            else None
        )
        if squares is not None:
            stacked_norms.append((indices, pending.add(squares.sqrt_())))
        else:
            group_needs.append(needs)
    # the grads read alone (a set difference, not a test a grad: on a model of small
    # tensors nearly every grad is in a group)
    alone = sorted(views.keys() - grouped)
    loose: dict[int, torch.Tensor] = {}
    for i in alone:
        if i in sums_at:
            continue
        view = views[i]
        loose[i] = _fused_sums_only(view) if layouts[i] == "fused" else _checksum(view)
        if i not in unchanged:
            needs_norm.append(i)
    sums_at.update(_stacked(loose, pending))
    del loose
    norm_pieces = stacked_norms + _read_norms(views, needs_norm, group_needs, squares_at, pending)
    index_at = {
        i: pending.add(grads[i]._indices().sum().reshape(1).to(torch.int64))
        for i in irregular
        if grads[i].layout == torch.sparse_coo
    }
    sample_at.update(_stacked_samples({i: views[i] for i in alone if i not in sample_at}, pending))
    param_at.update(
        _stacked_samples(
            {
                i: local(params[i])
                for i in sorted(sample_params - param_at.keys() - params_grouped)
                if grads[i] is not None and grads[i].layout == torch.strided
            },
            pending,
        )
    )
    state_at: dict[int, dict[str, int]] = {}
    group_states: dict[tuple[int, ...], dict[str, int]] = {}  # a group's, as rows
    if states is not None:  # copied like the samples: one stack per shape, not one piece each
        for indices in group_at if states_of_group is not None else ():
            if not any(i in unchanged for i in indices):
                rows = states_of_group([params[i] for i in indices])
                if rows is not None:
                    group_states[indices] = {k: pending.add(v) for k, v in rows.items()}
        in_rows = {i for indices in group_states for i in indices}
        sampled_states: dict[tuple[int, str], torch.Tensor] = {}
        for i in views:
            if i not in unchanged and i not in in_rows:
                state_at[i] = {}
                sampled_states.update(((i, k), v) for k, v in states(params[i]).items())
        for (i, k), slot in _stacked(sampled_states, pending, views=True).items():
            state_at[i][k] = slot
    pending.fetch(_to_host)

    norm_of: dict[int, float] = {}
    norms_of_group: dict[tuple[int, ...], list[float]] = {}  # a piece that is one group's
    for indices, slot in norm_pieces:
        values = pending.whole(slot).tolist()
        norm_of.update(zip(indices, values, strict=True))
        norms_of_group[tuple(indices)] = values
    prior_norms = before.norms() if before is not None and unchanged else None

    groups: dict[tuple[int, ...], GroupRows] = {}
    for indices, (key, sums_slot, samples_slot, params_slot) in group_at.items():
        prior = before.groups.get(indices) if before is not None else None
        if prior is not None and all(i in unchanged for i in indices):
            # the same tensors at the same versions (a clean step): before's grads,
            # versions and norms, as they are
            held, versions, norms = prior.grads, prior.versions, prior.norms
        else:
            held = [grads[i] for i in indices]
            versions = [grad_versions[i] for i in indices]
            norms = norms_of_group.get(indices) or [
                norm_of[i] if i in norm_of else prior_norms[i] for i in indices
            ]
        groups[indices] = GroupRows(
            indices=indices,
            key=key,
            grads=held,
            versions=versions,
            sums=pending.whole(sums_slot),
            bits=pending.whole_bits(samples_slot),
            samples=pending.tensor(samples_slot),
            norms=norms,
            param_samples=None if params_slot is None else pending.tensor(params_slot),
            params_sampled=(
                frozenset(indices)
                if sample_params.issuperset(indices)
                else frozenset(i for i in indices if i in sample_params)
            ),
            states=(
                {k: pending.tensor(j) for k, j in group_states[indices].items()}
                if indices in group_states
                else None
            ),
        )

    def param_sample(i: int) -> torch.Tensor | None:  # a grad's own (not a group's)
        return pending.tensor(param_at[i]) if i in param_at and i in sample_params else None

    # what the snapshot keeps for the fingerprints it builds on demand: the state samples
    # (views of their pieces), not ``pending`` (every piece of the transfer, its numpy views)
    state_host = {
        i: {k: pending.tensor(j) for k, j in slots.items()} for i, slots in state_at.items()
    }
    state_samples_of = state_host.get

    def build(i: int, group: GroupRows, row: int) -> GradFingerprint:
        """Grad ``i``'s fingerprint, from its group's rows."""
        return GradFingerprint(
            ref=weakref.ref(group.grads[row]),
            version=group.versions[row],
            norm=group.norms[row],
            checksum=_digest_of(group.sums[row], group.bits[row], None),
            sample=group.samples[row],
            states=(
                {k: rows[row] for k, rows in group.states.items()}
                if group.states is not None
                else state_samples_of(i)
            ),
            param_sample=(
                group.param_samples[row]
                if group.param_samples is not None and i in group.params_sampled
                else None
            ),
            layout="blocks",
        )

    out: list[GradFingerprint | None] = [None] * len(params)
    kept: set[int] = set()
    recheck: list[int] = []
    for indices, group in groups.items():
        stays = [i for i in indices if i in unchanged]
        if not stays:
            continue
        prior = before.groups.get(indices)
        same = group.same_rows(prior) if prior is not None else None
        for k, i in enumerate(indices):
            if i not in unchanged:
                continue
            if same is not None:
                if same[k]:
                    kept.add(i)  # the same tensor, version and bits: before's fingerprint
                else:
                    out[i] = build(i, group, k)
                    recheck.append(i)  # changed behind the version counter (.data): read it
            else:  # before read it alone: compare digests
                fp = build(i, group, k)
                if fp.checksum == before[i].checksum:
                    kept.add(i)
                else:
                    out[i] = fp
                    recheck.append(i)
    for i in sorted(set(range(len(params))) - grouped) if grouped else range(len(params)):
        p, g = params[i], grads[i]
        if g is None:
            out[i] = ABSENT
            continue
        index_sum = pending.array(index_at[i]) if i in index_at else None
        checksum = _digest_of(pending.array(sums_at[i]), pending.bits(sample_at[i]), index_sum)
        if i in unchanged:  # the same tensor at the same version
            prior_fp = before[i]
            if checksum != prior_fp.checksum:
                recheck.append(i)  # changed behind the version counter (.data): read it
            elif not full:
                kept.add(i)  # nothing moved: the fingerprint from before holds
                continue
            norm = prior_fp.norm  # read again below where the bits moved
        elif i in squares_at:
            norm = math.sqrt(float(pending.array(squares_at[i])))
        else:
            norm = norm_of[i]
        out[i] = GradFingerprint(
            ref=weakref.ref(g),
            version=grad_versions[i],
            norm=norm,
            checksum=checksum,
            sample=pending.tensor(sample_at[i]),
            param_sample=param_sample(i),
            full=views[i].clone() if full else None,
            full_param=(
                local(p).detach().clone()
                if full and i in sample_params and g.layout == torch.strided
                else None
            ),
            states=state_samples_of(i),
            layout=layouts[i],
        )
    for i in recheck:
        out[i] = _reread(out[i], views[i], params[i], states)
    hashed = None
    if before is None and digests:  # what ranks compare: the grads step() is given
        hashed = _digests(grads, groups, sums_at, sample_at, index_at, pending)
    return Snapshot(
        out,
        groups,
        kept=kept,
        before=before,
        build=build,
        digests=hashed,
        states=state_samples_of,
    )


#: the fingerprint of a parameter without a grad
ABSENT = GradFingerprint(None, 0, 0.0, b"", None, None)


def _read_norms(
    views: dict[int, torch.Tensor],
    needs_norm: list[int],
    group_needs: list[list[int]],
    squares_at: dict[int, int],
    pending: _Pending,
) -> list[tuple[list[int], int]]:
    """The norms of the grads ``needs_norm`` and ``group_needs`` (a group's each: one shape,
    dtype and device), where the fused kernel did not read them, as pieces of ``pending``
    (the grads' indices, the piece's slot): small CPU grads by one call of the C kernel per
    dtype (float64 sums; torch's norm costs the host about a microsecond a tensor), the
    others by ``_foreach_norm``, one stack per device. A grad's norm is read the same way
    whatever its neighbours: a group's by the kernel in one call where every one of them is
    what it reads (``fused.plain_squares``), else each as if alone."""
    pieces: list[tuple[list[int], int]] = []
    small: dict[torch.dtype, list[int]] = {}
    rest: list[int] = []
    alone = list(needs_norm)
    for members in group_needs:
        squares = fused.plain_squares([views[i] for i in members]) if len(members) > 1 else None
        if squares is None:
            alone += members
        else:
            pieces.append((members, pending.add(squares.sqrt_())))
    for i in alone:
        if i in squares_at:
            continue
        if fused.squares_reads(views[i]):
            small.setdefault(views[i].dtype, []).append(i)
        else:
            rest.append(i)
    for indices in small.values():
        squares = fused.squares([views[i] for i in indices])
        if squares is None:
            rest += indices
        else:
            pieces.append((indices, pending.add(squares.sqrt_())))
    if rest:
        # one kernel per (device, dtype) group, one stack per device
        norms = torch._foreach_norm([views[i] for i in rest])
        by_device: dict[torch.device, list[int]] = {}
        for k, norm in enumerate(norms):
            by_device.setdefault(norm.device, []).append(k)
        for ks in by_device.values():
            stacked = torch.stack([norms[k] for k in ks]).to(torch.float64)
            pieces.append(([rest[k] for k in ks], pending.add(stacked)))
    return pieces


def _digests(
    grads: list[torch.Tensor | None],
    groups: dict[tuple[int, ...], GroupRows],
    sums_at: dict[int, int],
    sample_at: dict[int, int],
    index_at: dict[int, int],
    pending: _Pending,
) -> list[int]:
    """Each grad's ``rows.row_digests`` digest (0: none): a group's in one pass over its
    rows, any other grad's from its own, alike."""
    out = [0] * len(grads)
    for indices, group in groups.items():
        for i, value in zip(indices, row_digests(group.sums, group.bits), strict=True):
            out[i] = value
    for i, slot in sums_at.items():
        index_sum = pending.array(index_at[i]).reshape(1, -1) if i in index_at else None
        (out[i],) = row_digests(
            pending.array(slot).reshape(1, -1), pending.bits(sample_at[i]).reshape(1, -1), index_sum
        )
    return out


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
