"""sfdiag.step_audit.snapshot: two reads per audited step (the fused kernel where it pays), one
transfer per snapshot, and the same verdicts whichever path read the grads."""

from __future__ import annotations

import collections
import functools
import json
import shutil
import subprocess

import pytest
import torch
from conftest import cli_env, run_cli
from torch.overrides import TorchFunctionMode

from sfdiag.optim import AdamWScheduleFree
from sfdiag.step_audit import fused as sfdiag_fused
from sfdiag.step_audit import snapshot, verdict

BIG = (641, 1023)  # 655,743 elements: ten fused blocks and a tail


def param(shape=BIG, seed=0, dtype=torch.float32) -> torch.nn.Parameter:
    generator = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))
    p.grad = torch.randn(shape, generator=generator, dtype=dtype)
    return p


@pytest.fixture(params=["torch-ops", "fused"])
def path(request, monkeypatch):
    monkeypatch.setenv("SFDIAG_FUSED", "1" if request.param == "fused" else "0")
    return request.param


def _swap(g: torch.Tensor) -> None:
    flat = g.view(-1)
    a, b = flat[3].item(), flat[400_000].item()
    flat[3], flat[400_000] = b, a


EDITS = {
    "none": (lambda p: None, "clean"),
    "scale": (lambda p: p.grad.mul_(0.5), "mutated"),
    "weight decay": (lambda p: p.grad.add_(p.detach(), alpha=0.01), "mutated"),
    "one element, through .data": (lambda p: p.grad.data.view(-1)[12_345].add_(1e-3), "mutated"),
    "a swap across blocks": (lambda p: _swap(p.grad), "mutated"),
    "same bits, new version": (lambda p: p.grad.mul_(1.0), "clean"),
    "replaced": (lambda p: setattr(p, "grad", p.grad.clone()), "replaced"),
    "cleared": (lambda p: setattr(p, "grad", None), "cleared"),
}


def check_edit(p: torch.nn.Parameter, edit: str):
    """Fingerprints of ``p`` before and after ``EDITS[edit]``: the edit classified as it
    should be, the norm after it read right, and a grad nothing touched keeping its
    fingerprint (the same object after ``step()``). Returns both."""
    before = snapshot.take([p])
    change, expected = EDITS[edit]
    change(p)
    after = snapshot.take([p], param_samples=False, before=before)
    a, b = before[0], after[0]
    same_object = b.present and a.ref() is b.ref()
    assert verdict.classify(b.present, same_object, same_object and a.same_content(b)) == expected
    if b.present:
        assert b.layout == a.layout
        assert b.norm == pytest.approx(float(p.grad.double().norm()), rel=1e-5)
        assert b.sample is not None
    assert (b is a) == (edit == "none")
    return a, b


@pytest.mark.parametrize("edit", list(EDITS))
def test_every_edit_reads_alike_on_both_paths(path, edit):
    before, _ = check_edit(param(), edit)
    assert before.layout == ("fused" if path == "fused" else "blocks")


@pytest.mark.parametrize("n", [1, 255, 256, 257, 271, 272, 300, 4096, 65_537, 655_743])
@pytest.mark.parametrize("contiguous", [True, False])
def test_a_sample_holds_the_elements_sample_positions_names(n, contiguous):
    """Evenly spread, none twice; the same elements whether the tensor is contiguous or not
    (a strided view is sampled in its logical order)."""
    storage = torch.randn(n, 2, generator=torch.Generator().manual_seed(n))
    t = storage[:, 0].clone() if contiguous else storage[:, 0]  # every other element
    values = t.clone()
    positions = snapshot.sample_positions(n)
    assert positions == sorted(set(positions)) and len(positions) == min(n, snapshot.SAMPLE_SIZE)
    if n > snapshot.SAMPLE_SIZE:
        size = snapshot.SAMPLE_SIZE  # the last one in the last 1/size (rounding aside)
        assert positions[0] == 0 and positions[-1] >= n * (size - 1) // size - size
    assert torch.equal(snapshot.sample_of(t), values[positions])


def test_a_row_sparse_grad_shows_the_sample_its_rows():
    """An embedding's grad with 4 % of its rows set (the batch's tokens): the sample holds
    non-zero elements whichever rows they are, so a mutation's kind can be named. (Runs of
    consecutive elements at 16 places miss them in 7 of these 20.)"""
    rows, width = 20_000, 64
    for seed in range(20):
        grad = torch.zeros(rows, width)
        chosen = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
        grad[chosen[: rows // 25]] = 1.0
        assert snapshot.sample_of(grad).count_nonzero() > 0, seed


@pytest.mark.parametrize("shape", [(5,), (64,), (300,), (100, 7), (64, 64), (65_536,)])
def test_a_grad_reads_alike_alone_and_stacked_with_its_twin(shape):
    """Small grads of one size are read stacked; a grad whose twin step() cleared is read
    alone after it. The same checksum either way, so it stays clean (and its fingerprint
    is kept), whether its size splits into whole blocks or leaves some elements over."""
    p, twin = param(shape, seed=1), param(shape, seed=2)
    before = snapshot.take([p, twin])
    twin.grad = None
    after = snapshot.take([p, twin], param_samples=False, before=before)
    assert after[0] is before[0]
    assert snapshot.take([p])[0].checksum == before[0].checksum


def _set_data(grad: torch.Tensor, data: torch.Tensor) -> None:
    grad.data = data  # the same tensor object, another shape or dtype, no version moved


#: what a step may do to a group's grads under them, and the grads it mutates
GROUP_EDITS = {
    "nothing": (lambda grads: None, []),
    "every grad scaled": (lambda grads: [g.mul_(0.5) for g in grads], [0, 1, 2, 3, 5, 6]),
    "one grad's shape, through .data": (lambda grads: _set_data(grads[2], torch.ones(5, 3)), [2]),
    "one grad's dtype, through .data": (
        lambda grads: _set_data(grads[2], grads[2].data.double()),
        [2],
    ),
    "every grad's shape, through .data": (
        lambda grads: [_set_data(g, torch.full((2, 2), float(k))) for k, g in enumerate(grads)],
        [0, 1, 2, 3, 5, 6],
    ),
}


@pytest.mark.parametrize("edit", list(GROUP_EDITS))
def test_a_group_read_again_after_step_reads_as_its_grads_alone(edit):
    """After ``step()`` the groups read before it are read as groups again without looking
    for them grad by grad, where their grads are still the same tensors in the same dtype;
    a grad whose shape or dtype moved under them (``.data =``) is read alone, and one that
    appeared with the group's shape joins none of them. Every grad reads as it would alone
    (its checksum and norm bits), its param's sample is its own, and each is judged as the
    edit says."""
    params = [param((3, 5), seed=k) for k in range(7)]
    params[4].grad = None  # no grad before step(): one appears after it
    before = snapshot.take(params)
    assert [group.indices for group in before.groups.values()] == [(0, 1, 2, 3, 5, 6)]
    for i, p in enumerate(params):
        if i != 4:
            assert torch.equal(before.param_sample(i), snapshot.sample_of(p))
    change, mutated = GROUP_EDITS[edit]
    change([p.grad for p in params if p.grad is not None])
    params[4].grad = torch.ones(3, 5)
    after = snapshot.take(params, param_samples=False, before=before)
    for i, p in enumerate(params):
        alone = snapshot.take([p], param_samples=False)[0]
        assert after[i].checksum == alone.checksum
        assert snapshot.float_bits(after[i].norm) == snapshot.float_bits(alone.norm)
        if i == 4:
            continue
        a, b = before[i], after[i]
        same_object = a.ref() is b.ref()
        kind = verdict.classify(b.present, same_object, same_object and a.same_content(b))
        assert kind == ("mutated" if i in mutated else "clean"), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(0,), (5,), (64, 64), (65_536,)])
@pytest.mark.parametrize("odd_one", [None, "transposed", "subclass"])
def test_a_groups_norms_are_each_grads_own_bits(dtype, shape, odd_one):
    """A group's norms come from its stack's rows where the kernel reads every grad as it is
    (plain, contiguous), else each grad's the way it is read alone: the same bits either
    way, whatever its neighbours (a transposed grad among them, or a tensor subclass)."""
    params = [param(shape, seed=k, dtype=dtype) for k in range(3)]
    if odd_one == "transposed" and len(shape) == 2:
        params[1].grad = params[1].grad.t().contiguous().t()
        assert not params[1].grad.is_contiguous()
    if odd_one == "subclass":
        params[2].grad = params[2].grad.as_subclass(_Subclass)
    together = snapshot.take(params).norms()
    for p, norm in zip(params, together, strict=True):
        alone = snapshot.take([p]).norms()[0]
        assert snapshot.float_bits(norm) == snapshot.float_bits(alone)


class _Subclass(torch.Tensor):
    """A tensor subclass as a grad (the kernel reads plain tensors only)."""


def test_samples_of_every_size_and_shape_are_each_tensors_own(path):
    """take() copies the samples of many tensors in a few stacked copies: each fingerprint
    must still hold its own grad's and param's elements, whatever mix of sizes, shapes and
    dtypes a model has."""
    shapes = [(5,), (256,), (16, 16), (300,), (4096,), BIG, (3, 7), (5,), (256,)]
    params = [param(shape, seed=k) for k, shape in enumerate(shapes)]
    params.append(param((700,), seed=99, dtype=torch.bfloat16))
    for fp, p in zip(snapshot.take(params), params, strict=True):
        assert torch.equal(fp.sample, snapshot.sample_of(p.grad))
        assert torch.equal(fp.param_sample, snapshot.sample_of(p.detach()))


def test_the_fused_norm_is_precise_and_consistent(monkeypatch):
    monkeypatch.setenv("SFDIAG_FUSED", "1")
    p = param(seed=3)
    fused = snapshot.take([p])[0]
    assert fused.layout == "fused" and sfdiag_fused.broken() is None
    assert fused.norm == pytest.approx(float(p.grad.double().norm()), rel=1e-7)
    again = snapshot.take([p])[0]
    assert fused.same_content(again) and fused.checksum == again.checksum


def test_a_grad_keeps_its_layout_from_before_to_after(monkeypatch):
    monkeypatch.setenv("SFDIAG_FUSED", "0")
    p = param()
    before = snapshot.take([p])
    monkeypatch.setenv("SFDIAG_FUSED", "1")  # the kernel may exist by now: the layout holds
    snapshot.take([param(seed=9)])
    p.grad.mul_(1.0)
    after = snapshot.take([p], before=before)
    assert after[0].layout == "blocks" and before[0].same_content(after[0])


def test_small_and_sparse_grads_take_torch_ops(monkeypatch):
    monkeypatch.setenv("SFDIAG_FUSED", "1")
    small = param((3, 5))
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    prints = snapshot.take([small, emb.weight])
    assert [fp.layout for fp in prints] == ["blocks", "blocks"]
    grad = emb.weight.grad
    emb.weight.grad = torch.sparse_coo_tensor(  # the same values at other rows
        grad._indices() + 1, grad._values(), grad.shape
    )
    moved = snapshot.take([small, emb.weight])
    assert prints[1].norm == moved[1].norm and prints[1].checksum != moved[1].checksum


def test_pack_moves_every_piece_in_one_buffer():
    pieces = [
        torch.arange(65, dtype=torch.int32),  # 260 bytes: what follows must still be aligned
        torch.tensor(3.5, dtype=torch.float64),
        torch.tensor([1, 2, 3], dtype=torch.int16),
        torch.arange(65, dtype=torch.int64),
        torch.randn(256),
        torch.randn(7, dtype=torch.bfloat16),
        torch.tensor([True, False]),
    ]
    back = snapshot.pack(pieces)
    assert len(back) == len(pieces)
    for got, want in zip(back, pieces, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


#: sizes the kernel must read like torch's ops: whole rows, a tail, a tail not of whole
#: vector steps, a row count that threads split unevenly, the fewest elements it takes
KERNEL_SIZES = [4 * 65536, 641 * 1023, 5 * 65536 + 17, 37 * 65536 + 65535, 256]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 3])
def test_the_kernel_reads_what_torch_ops_read(dtype, threads, monkeypatch):
    """One call over tensors of every size: each one's row bit-sums as torch's ops sum
    them, the elements sample_positions names (of its param too, where one is given), the
    sum of squares within 1e-7 of float64's where asked (0 where not), and the same bits
    whatever the number of threads."""
    params = [param((n,), seed=k, dtype=dtype) for k, n in enumerate(KERNEL_SIZES)]
    tensors = [p.grad for p in params]
    want = [k % 2 == 0 for k in range(len(tensors))]
    sampled = [p.detach() if k % 3 else None for k, p in enumerate(params)]
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    read = sfdiag_fused.read(tensors, want, snapshot.FUSED_BLOCK, snapshot.SAMPLE_SIZE, sampled)
    assert read is not None, sfdiag_fused.broken()
    for k, t in enumerate(tensors):
        start, stop = read.bounds[k]
        assert torch.equal(read.row_sums[start:stop], snapshot._fused_sums_only(t))
        assert snapshot._bits_equal(read.samples[k], snapshot.sample_of(t))
        if sampled[k] is not None:
            assert snapshot._bits_equal(read.param_samples[k], snapshot.sample_of(sampled[k]))
        exact = float(t.double().square().sum()) if want[k] else 0.0
        assert float(read.squares[k]) == pytest.approx(exact, rel=1e-7)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    alone = sfdiag_fused.read(tensors, want, snapshot.FUSED_BLOCK, snapshot.SAMPLE_SIZE)
    assert snapshot._bits_equal(alone.squares, read.squares) and not alone.param_samples.numel()
    # every row's sums the same bits however the rows are grouped and split among threads
    everything = [True] * len(tensors)
    one = sfdiag_fused.read(tensors, everything, snapshot.FUSED_BLOCK, snapshot.SAMPLE_SIZE)
    for split in (2, 3, 5, 7):
        monkeypatch.setattr(torch, "get_num_threads", lambda split=split: split)
        got = sfdiag_fused.read(tensors, everything, snapshot.FUSED_BLOCK, snapshot.SAMPLE_SIZE)
        assert snapshot._bits_equal(got.squares, one.squares)
        assert torch.equal(got.row_sums, one.row_sums)
    with pytest.raises(ValueError, match="must match its grad"):
        sfdiag_fused.read(tensors[:1], [True], snapshot.FUSED_BLOCK, 256, [params[1].detach()])


def test_grads_read_together_fingerprint_as_alone(monkeypatch):
    """A snapshot of many large grads (one kernel call) gives each the fingerprint it gets
    alone."""
    monkeypatch.setenv("SFDIAG_FUSED", "1")
    params = [param((n,), seed=k) for k, n in enumerate(KERNEL_SIZES[:4])]
    together = snapshot.take(params)
    for fp, p in zip(together, params, strict=True):
        alone = snapshot.take([p])[0]
        assert fp.layout == alone.layout == "fused" and fp.checksum == alone.checksum
        assert snapshot.float_bits(fp.norm) == snapshot.float_bits(alone.norm)


def test_without_a_compiler_torch_ops_read_the_fused_layout(monkeypatch):
    """No C compiler (or one that fails): the kernel is off for the process, says why, and
    torch's ops read the same grads to the same fingerprints' verdicts."""
    monkeypatch.setenv("SFDIAG_FUSED", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(sfdiag_fused, "_KERNEL", sfdiag_fused._Kernel())
    p = param(seed=5)
    before = snapshot.take([p])
    assert "nonexistent" in (sfdiag_fused.broken() or "")
    assert sfdiag_fused.read([p.grad], [True], snapshot.FUSED_BLOCK, 256) is None
    assert before[0].layout == "fused"
    assert before[0].norm == pytest.approx(float(p.grad.double().norm()), rel=1e-5)
    assert snapshot.take([p], param_samples=False, before=before)[0] is before[0]
    p.grad.data.mul_(0.5)
    after = snapshot.take([p], param_samples=False, before=before)
    assert not before[0].same_content(after[0])
    assert after[0].norm == pytest.approx(before[0].norm / 2, rel=1e-5)


@pytest.mark.parametrize("shape", [(4, 64), (1024, 1024)])
def test_a_grad_negated_through_data_is_mutated(path, shape):
    """Negating every element flips every sign bit: each block of an even number of elements
    keeps its bit-sum (2 * 2**31 wraps to 0) and the norm is the same, so the sample, taken
    after step() even from a grad at its old version and hashed into the checksum, is what
    sees it."""
    p = param(shape)
    before = snapshot.take([p])
    block_sums = snapshot._fused_sums_only if before[0].layout == "fused" else snapshot._checksum
    sums = block_sums(p.grad)
    p.grad.data.neg_()
    assert torch.equal(block_sums(p.grad), sums)  # the blind spot this test is about
    after = snapshot.take([p], param_samples=False, before=before)
    assert after[0].checksum != before[0].checksum
    assert not before[0].same_content(after[0])
    assert after[0].norm == before[0].norm


class _TorchCalls(TorchFunctionMode):
    """Counts torch calls that reach torch's dispatcher (not attribute reads or size queries:
    on a GPU those cost the host next to nothing, a dispatched call several µs)."""

    CHEAP = frozenset(
        ["__get__", "numel", "is_contiguous", "storage_offset", "is_floating_point"]
        + ["element_size", "dim", "size", "stride", "__len__", "data_ptr"]
    )

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") not in self.CHEAP
        return func(*args, **(kwargs or {}))


#: host calls a grad more costs a snapshot, read as on an accelerator: (shape, before
#: step(), after a step that left it alone, after sf-adamw's, which divides it in place)
HOST_CALLS = [
    ((512, 1024), 5, 4, 6),
    ((256, 512), 5, 4, 6),
    ((1024,), 0, 0, 0),
    ((16, 16), 0, 0, 0),
]
#: the fused layout; blocks; small ones read as a group, whatever their number
HOST_CALL_IDS = ["large", "mid", "small", "tiny"]


def host_calls_a_grad(shape, move=lambda p: p) -> dict[str, float]:
    """The torch calls (dispatched ones) a grad more costs each snapshot of a step: with
    10 and 20 grads of ``shape`` (moved by ``move``), before ``step()``, after a step that
    left them alone and after sf-adamw's, the state sampled as the auditor does off the
    CPU."""
    calls = collections.Counter()
    for count, sign in ((10, -1), (20, 1)):
        params = [move(param(shape, seed=k)) for k in range(count)]
        opt = AdamWScheduleFree(params)
        opt.train()
        opt.step()  # its state now exists
        snapshot.take(params)  # any first-call work
        with _TorchCalls() as counter:
            before = snapshot.take(params)
        calls["pre"] += sign * counter.count
        with _TorchCalls() as counter:
            after = snapshot.take(params, param_samples=False, before=before)
        calls["post"] += sign * counter.count
        assert all(b is a for a, b in zip(before, after, strict=True))  # read, and kept
        opt.step()
        with _TorchCalls() as counter:
            snapshot.take(
                params,
                param_samples=False,
                before=before,
                states=lambda p, opt=opt: snapshot.state_views(opt, p),
                states_of_group=functools.partial(snapshot.state_rows, opt),
            )
        calls["post_mutated"] += sign * counter.count
    return {key: value / 10 for key, value in calls.items()}


@pytest.mark.parametrize("shape,pre,post,post_mutated", HOST_CALLS, ids=HOST_CALL_IDS)
def test_a_snapshot_costs_a_few_host_calls_a_grad(shape, pre, post, post_mutated, monkeypatch):
    """Read as on an accelerator (torch's ops on the fused layout, one packed transfer, the
    optimizer's state sampled with the grads), where each dispatched call costs the host
    several µs and the host is what a step waits for: a grad more costs at most ``pre``
    calls before step() (its checksum's view and sum, its sample and its parameter's),
    ``post`` after a step that left it alone and ``post_mutated`` after sf-adamw's (its
    norm and state are read then too), whatever the number of grads; a small one, read
    with the others of its shape, none. (tests/test_cuda.py counts the same on a GPU,
    without these patches.)"""
    monkeypatch.setattr(snapshot, "_kernel_reads", lambda view: False)
    monkeypatch.setattr(
        snapshot,
        "_fused_grads",
        lambda views: {i for i, v in views.items() if snapshot._fused_eligible(v)},
    )
    monkeypatch.setattr(snapshot, "_to_host", snapshot.pack)
    calls = host_calls_a_grad(shape)
    assert calls["pre"] <= pre and calls["post"] <= post and calls["post_mutated"] <= post_mutated


@pytest.mark.parametrize("shape", [(1024,), (16, 16), (3, 5)])
def test_a_group_of_small_grads_costs_no_torch_call_a_grad(shape):
    """The CPU's own path, as it runs: small grads of one shape are read as a group (one
    stack, one op for their checksums, one for their samples, one kernel call or foreach
    norm for their norms, one stack per state name), so the torch calls of a snapshot do
    not grow with the number of grads in it, before ``step()``, after a clean one and
    after one that mutated every grad."""
    assert host_calls_a_grad(shape) == {"pre": 0, "post": 0, "post_mutated": 0}


@pytest.mark.parametrize("transfer", ["direct", "packed"])
def test_state_sampled_with_a_snapshot_is_copied(path, transfer, monkeypatch):
    """The auditor's sampler on an accelerator (``state_views``): take() brings the
    optimizer's state at the sampled elements with the rest, in one stack per shape; the
    elements ``state_samples`` names, copied, so the next step does not move them."""
    if transfer == "packed":  # what an accelerator does, forced on the CPU
        monkeypatch.setattr(snapshot, "_to_host", snapshot.pack)
    params = [param(shape, seed=k) for k, shape in enumerate([BIG, (300,), (300,), (5,)])]
    opt = AdamWScheduleFree(params)
    opt.train()
    opt.step()  # its state now exists; p.grad holds the update
    before = snapshot.take(params)
    opt.step()  # divides p.grad in place: every version moves
    expected = [snapshot.state_samples(opt, p) for p in params]
    after = snapshot.take(
        params,
        param_samples=False,
        before=before,
        states=lambda p: snapshot.state_views(opt, p),
    )
    opt.step()  # moves the state on
    for fp, wanted in zip(after, expected, strict=True):
        assert set(fp.states) == set(wanted) == {"z", "exp_avg_sq"}
        for key, value in fp.states.items():
            assert torch.equal(value, wanted[key]) and value.device.type == "cpu"


def test_a_snapshot_through_one_packed_transfer_reads_alike(path, monkeypatch):
    """What an accelerator does (every piece packed into one buffer, copied once, cut back),
    forced on the CPU: the same fingerprints as reading the pieces where they lie."""
    shapes = [BIG, (300,), (300,), (5,), (16, 16), (4096,), (4096,)]
    params = [param(shape, seed=k) for k, shape in enumerate(shapes)]
    direct = snapshot.take(params)
    packed_calls = []

    def packed(pieces):
        packed_calls.append(len(pieces))
        return snapshot.pack(pieces)

    monkeypatch.setattr(snapshot, "_to_host", packed)
    moved = snapshot.take(params)
    assert len(packed_calls) == 1  # one transfer for the whole snapshot
    for a, b in zip(direct, moved, strict=True):
        assert a.norm == b.norm and a.checksum == b.checksum and a.layout == b.layout
        assert torch.equal(a.sample, b.sample) and torch.equal(a.param_sample, b.param_sample)
    params[0].grad.mul_(2.0)  # a new version: read whole, with the optimizer's state sampled
    params[1].grad.data[7] += 1.0  # behind the version counter: its norm read again, in one more

    def states(p):  # as the auditor's sampler: the state at the sampled elements
        return {"exp_avg_sq": snapshot.sample_of(p.detach().square().to(torch.float16))}

    after = snapshot.take(params, param_samples=False, before=moved, states=states)
    assert [b is a for a, b in zip(moved, after, strict=True)] == [k > 1 for k in range(7)]
    assert not moved[1].same_content(after[1]) and len(packed_calls) == 3
    assert after[0].norm == pytest.approx(2 * moved[0].norm, rel=1e-7)
    for k in (0, 1):
        got = after[k].states["exp_avg_sq"]
        assert torch.equal(got, states(params[k])["exp_avg_sq"])


def test_a_large_grad_replaced_by_a_strided_one_reads_as_replaced(path):
    """The layout a grad had before step() is kept after it, even for a replacement the
    fused read could not take as it is (channels-last, transposed): it is read from a copy."""
    p = param((1024, 768))
    before = snapshot.take([p])
    p.grad = p.grad.t().contiguous().t()  # the same values, column-major
    assert not p.grad.is_contiguous()
    after = snapshot.take([p], param_samples=False, before=before)
    assert after[0].layout == before[0].layout
    assert after[0].norm == pytest.approx(before[0].norm, rel=1e-5)  # float32 sums: by order
    assert after[0].checksum == before[0].checksum  # the same bits, read in the same order
    assert before[0].ref() is not after[0].ref()  # a replacement, which the auditor names so


@pytest.mark.parametrize("setting", ["auto", "0", "1"])
def test_which_grads_take_the_fused_layout_and_who_reads_them(setting, monkeypatch):
    """The policy, on tensors of no storage (the meta device stands in for an accelerator:
    only where a tensor lives matters): on the CPU the fused layout pays once a snapshot's
    large grads hold FUSED_MIN_ELEMENTS; on an accelerator every large grad takes it, and in
    torch's ops read it there (the kernel reads the CPU's only)."""
    monkeypatch.setenv("SFDIAG_FUSED", setting)
    rows = snapshot.FUSED_MIN_ROWS * snapshot.FUSED_BLOCK
    many = -(-snapshot.FUSED_MIN_ELEMENTS // rows)  # the fewest that hold enough
    few = many - 1
    small = {0: torch.empty(100, device="meta")}
    for device, count in (("cpu", few), ("cpu", many), ("meta", 1)):
        views = {**small, **{k + 1: torch.empty(rows, device=device) for k in range(count)}}
        fused = snapshot._fused_grads(views)
        large = set(views) - {0}
        wanted = {"0": set(), "1": large}.get(setting, large if count != few else set())
        assert fused == wanted, (device, count)
    cpu, meta = torch.empty(rows), torch.empty(rows, device="meta")
    assert snapshot._kernel_reads(cpu) and not snapshot._kernel_reads(meta)
    assert not snapshot._kernel_reads(torch.empty(rows, dtype=torch.float64))


def test_a_grad_with_a_graph_is_read_without_building_one(path):
    """``backward(create_graph=True)`` leaves grads that require grad, and the step hooks
    run with grad mode on: a snapshot reads them detached (no graph kept alive by a
    fingerprint, and the compiled kernel takes them)."""
    p = param()
    p.grad = None
    (p.double() ** 3).sum().float().backward(create_graph=True)
    assert p.grad.requires_grad
    before = snapshot.take([p])[0]
    assert not before.sample.requires_grad and not before.param_sample.requires_grad
    # (float32 reduction of 3p², a heavy tail: torch's CPU norm is 2e-5 off float64's)
    assert before.norm == pytest.approx(float(p.grad.detach().double().norm()), rel=1e-4)
    assert snapshot.take([p], param_samples=False, before=[before])[0] is before


def test_compare_gives_the_same_verdicts_whichever_path_reads_the_grads(tmp_path):
    """End to end: ``sfdiag compare`` on mnist-cnn (its 1.2M-element layer takes the fused
    layout when forced), read by the kernel and by torch's ops: the same verdicts and kinds,
    norms alike to float32's rounding."""
    reports = {}
    for setting in ("0", "1"):
        done = run_cli(
            *("compare", "--model", "mnist-cnn", "--optimizers", "adamw,sf-adamw,sf-ref"),
            *("--steps", "3", "-f", "json", "-q"),
            cwd=tmp_path,
            env=cli_env(SFDIAG_FUSED=setting),
        )
        assert done.returncode == 0, done.stderr
        reports[setting] = json.loads(done.stdout)["results"]
    for ops, kernel in zip(reports["0"], reports["1"], strict=True):
        assert (ops["verdict"], ops["fingerprint"]) == (kernel["verdict"], kernel["fingerprint"])
        for key in ("pre_step_grad_norm", "post_step_grad_norm"):
            assert kernel[key] == pytest.approx(ops[key], rel=1e-4)
    assert [r["verdict"] for r in reports["1"]] == ["clean", "mutated", "clean"]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("arch", [["-march=native"], []], ids=["native", "portable"])
def test_the_kernel_source_compiles_without_a_warning(arch, tmp_path):
    """For this machine's CPU and for none in particular (the last flags fused.py tries):
    the fused read and the fits compiled with it."""
    done = subprocess.run(
        ["cc", *sfdiag_fused.FLAGS, *arch, "-Wall", "-Wextra", "-Werror", "-Wno-psabi"]
        + ["-o", str(tmp_path / "k.so"), str(sfdiag_fused.SOURCE), str(sfdiag_fused.FITS_SOURCE)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_a_large_sparse_grad_read_by_the_kernel_samples_no_param(monkeypatch):
    """A sparse grad's values, every row present, have its parameter's shape: still the
    values are not laid out as the parameter, so no parameter sample is taken for it, as
    on torch's path."""
    monkeypatch.setenv("SFDIAG_FUSED", "1")
    emb = torch.nn.Embedding(1024, 256, sparse=True)
    emb(torch.arange(1024).flip(0)).sum().backward()
    assert emb.weight.grad._values().shape == emb.weight.shape
    fp = snapshot.take([emb.weight])[0]
    assert fp.layout == "fused" and fp.param_sample is None
    assert fp.norm == pytest.approx(float(emb.weight.grad.coalesce()._values().double().norm()))
