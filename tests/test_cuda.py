"""The CUDA paths: the same fingerprints, verdicts and optimizer updates as on the CPU, one
host sync per snapshot, and seeded runs that repeat bit for bit.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py`` (``bench/cuda_check.sh`` does, beside the CUDA bench).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import run_cli
from test_optim import CASE_IDS, CASES, Case
from test_snapshot import (
    BIG,
    EDITS,
    HOST_CALL_IDS,
    HOST_CALLS,
    check_edit,
    host_calls_a_grad,
    param,
)

from sfdiag.optim import AdamWScheduleFree
from sfdiag.step_audit import fused, snapshot
from sfdiag.step_audit.auditor import StepAuditor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["torch-ops", "fused"])
def path(request, monkeypatch):
    monkeypatch.setenv("SFDIAG_FUSED", "1" if request.param == "fused" else "0")
    return request.param


def on_cuda(p: torch.nn.Parameter) -> torch.nn.Parameter:
    moved = torch.nn.Parameter(p.detach().cuda())
    moved.grad = p.grad.cuda() if p.grad is not None else None
    return moved


def host_syncs(fn) -> int:
    """How many times ``fn()`` made the host wait for the GPU (torch's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- fingerprints


SHAPES = [BIG, (300,), (300,), (5,), (16, 16), (4096,), (4096,), (1024, 1024), ()]


def test_a_snapshot_on_cuda_reads_as_on_the_cpu(path):
    """Checksums are integer sums (exact in any order): the same bits on both devices; the
    samples are the same elements; norms agree to float rounding."""
    params = [param(shape, seed=k) for k, shape in enumerate(SHAPES)]
    params.append(param((700,), seed=99, dtype=torch.bfloat16))
    host = snapshot.take(params)
    device = snapshot.take([on_cuda(p) for p in params])
    for a, b in zip(host, device, strict=True):
        assert a.layout == b.layout and a.checksum == b.checksum
        assert b.sample.device.type == "cpu"  # brought over with the rest, in one transfer
        assert torch.equal(a.sample, b.sample) and torch.equal(a.param_sample, b.param_sample)
        # float32 reductions: torch's CPU norm of a million elements is 1.2e-5 off float64
        assert b.norm == pytest.approx(a.norm, rel=5e-5)
    assert {fp.layout for fp in host[:1]} == {"fused" if path == "fused" else "blocks"}


@pytest.mark.parametrize("shape,pre,post,post_mutated", HOST_CALLS, ids=HOST_CALL_IDS)
def test_a_cuda_snapshot_costs_a_few_host_calls_a_grad(shape, pre, post, post_mutated, monkeypatch):
    """The host calls a grad more costs a snapshot on the GPU's own read path ("auto"), as
    tests/test_snapshot.py counts them on the CPU with that path forced."""
    monkeypatch.delenv("SFDIAG_FUSED", raising=False)
    calls = host_calls_a_grad(shape, move=on_cuda)
    assert calls["pre"] <= pre and calls["post"] <= post and calls["post_mutated"] <= post_mutated


def test_large_cuda_grads_take_the_fused_layout_read_by_torch_ops(monkeypatch):
    """In "auto" a GPU's large grads get the fused layout (one launch each for their row
    sums), read by torch's ops: the CPU's kernel never sees them."""
    monkeypatch.delenv("SFDIAG_FUSED", raising=False)

    def no_kernel(*args):
        raise AssertionError("the CPU's fused kernel ran on a CUDA grad")

    monkeypatch.setattr(fused, "read", no_kernel)
    params = [on_cuda(param(seed=k)) for k in range(3)]
    before = snapshot.take(params)
    assert [fp.layout for fp in before] == ["fused"] * 3
    for fp, p in zip(before, params, strict=True):
        assert fp.norm == pytest.approx(float(p.grad.double().norm()), rel=1e-5)
    params[1].grad.mul_(2.0)
    after = snapshot.take(params, param_samples=False, before=before)
    assert [b is a for a, b in zip(before, after, strict=True)] == [True, False, True]
    assert after[1].norm == pytest.approx(2 * before[1].norm, rel=1e-6)


@pytest.mark.parametrize("edit", list(EDITS))
def test_every_edit_reads_alike_on_cuda(path, edit):
    before, _ = check_edit(on_cuda(param()), edit)
    assert before.layout == ("fused" if path == "fused" else "blocks")


def test_a_sparse_grad_on_cuda_reads_as_on_the_cpu():
    prints = {}
    for device in ("cpu", "cuda"):
        emb = torch.nn.Embedding(10, 4, sparse=True).to(device)
        with torch.no_grad():
            emb.weight.copy_(torch.arange(40.0).view(10, 4))
        emb(torch.tensor([1, 2, 2], device=device)).sum().backward()
        emb.weight.grad = emb.weight.grad.coalesce()
        prints[device] = snapshot.take([emb.weight])[0]
    assert prints["cpu"].checksum == prints["cuda"].checksum
    assert prints["cpu"].norm == pytest.approx(prints["cuda"].norm, rel=1e-6)


# ----------------------------------------------------------------------------- host syncs


def test_the_sync_counter_sees_a_sync():
    """The counter below must not pass by seeing nothing. (How many warnings one wait
    raises varies: a snapshot's transfer raised one with torch 2.11 on an H100, a lone
    ``.item()`` two.)"""
    on_gpu = torch.ones(3, device="cuda")
    assert host_syncs(lambda: on_gpu.cpu()) >= 1
    assert host_syncs(lambda: on_gpu[0].item()) >= 1
    assert host_syncs(lambda: torch.ones(1, device="cuda").add_(1)) == 0


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 1024),  # 65,536 weights: small grads, stacked
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),  # 1M: fused when the fused path is on
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.LayerNorm(1024),
        torch.nn.Linear(1024, 10),
    ).cuda()


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "sf-adamw": lambda ps: AdamWScheduleFree(ps, lr=1e-3),
    "sf-adamw-loop": lambda ps: AdamWScheduleFree(ps, lr=1e-3, foreach=False),
    "sgd-clipping": lambda ps: torch.optim.SGD(ps, lr=1e-2),
}


@pytest.mark.parametrize("setting", ["0", "1", "auto"])  # off, the fused layout, the policy
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_host_sync_per_snapshot(setting, name, monkeypatch):
    """Each hook brings everything it needs to the host in one transfer: the sync of that
    copy is the only one, whether the grads are clean or mutated (by the optimizer, its
    state sampled in the same transfer, or by another hook), whichever path reads them."""
    monkeypatch.setenv("SFDIAG_FUSED", setting)
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    if hasattr(opt, "train"):
        opt.train()
    auditor = StepAuditor()
    x = torch.randn(32, 64, device="cuda")
    if name == "sgd-clipping":  # a mutation inside step() by another hand: grads scaled

        def clip(*_):
            torch._foreach_mul_([p.grad for p in model.parameters()], 0.5)

        opt.register_step_pre_hook(clip)
    counts = []
    for _ in range(3):  # the first creates the optimizer's state
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        pre = host_syncs(lambda: auditor.pre_step(opt))
        opt.step()
        post = host_syncs(lambda: auditor.post_step(opt))
        counts.append((pre, post))
    assert counts[1:] == [(1, 1), (1, 1)]
    kinds = {r.verdict for r in auditor.observations[-1].params}
    assert kinds == ({"clean"} if name == "adamw" else {"mutated"})


# ----------------------------------------------------------------------------- optimizers


def _train(case: Case, device: str, steps: int = 20, **overrides) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).to(
        device
    )
    opt = case.make(model.parameters(), **overrides)
    opt.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 3, generator=gen)
        opt.zero_grad()
        ((model(x.to(device)) - y.to(device)) ** 2).mean().backward()
        opt.step()
    opt.eval()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_each_optimizer_on_cuda_follows_its_cpu_run(case):
    for got, want in zip(_train(case, "cuda"), _train(case, "cpu"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c.id == "sf-adamw-foreach"], ids=["sf-adamw"])
def test_the_compiled_sf_adamw_step_on_cuda_matches_foreach(case):
    compiled = _train(case, "cuda", compile=True)
    for got, want in zip(compiled, _train(case, "cuda"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the CLI


def _compare(tmp_path, device: str, model: str) -> dict:
    done = run_cli(
        "compare", "--device", device, "--model", model, "--format", "json", cwd=tmp_path
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return json.loads(done.stdout)


def _verdicts(report: dict) -> list[tuple]:
    return [
        (r["optimizer"], r["verdict"], r["flagged"], r["params_mutated"], r["error"])
        for r in report["results"]
    ]


@pytest.mark.parametrize("model", ["mlp", "mnist-cnn"])
def test_compare_on_cuda_gives_the_cpu_verdicts_and_repeats_bit_for_bit(tmp_path, model):
    first, again = _compare(tmp_path, "cuda", model), _compare(tmp_path, "cuda", model)
    cpu = _compare(tmp_path, "cpu", model)
    assert first["config"]["device"] == "cuda" and _verdicts(first) == _verdicts(cpu)
    assert first["results"] == again["results"]  # the norms too: seeded runs repeat exactly


def test_sfdiag_run_judges_a_cuda_training_loop_as_a_cpu_one(tmp_path):
    """``sfdiag run`` around a loop that trains on the GPU (its clip total a CUDA tensor
    handed to TensorBoard): the same metrics, verdicts and judged steps as on the CPU."""
    from test_run_metrics import EXAMPLE, by_name, run

    verdicts = {}
    for device in ("cpu", "cuda"):
        argv = ["python", EXAMPLE, "--steps", "8", "--clip", "0.5", "--device", device]
        code, report = run(tmp_path, [*argv, "--logdir", str(tmp_path / device)])
        assert code == 0, report
        verdicts[device] = {
            name: (m["verdict"], m["matches"], m["steps_judged"])
            for name, m in by_name(report).items()
        }
    assert verdicts["cuda"] == verdicts["cpu"]
    assert verdicts["cuda"]["train/grad_norm_after_step"][0] == "post-step"
