"""The schedule-free optimizers' figures: sfdiag's ``step()`` against the public release's and
against the copy-bandwidth floor, on large tensors and on many tiny ones (the host's cost).

sf_adamw_step_vs_upstream
    ``sfdiag.optim.AdamWScheduleFree.step()`` over the public ``schedulefree`` 1.4.1
    release's ``AdamWScheduleFree.step()`` (the faster of its foreach and per-tensor
    paths), on 25M float32 parameters in 20 tensors. Also SGD (``sf_sgd_step_vs_upstream``).
    Full mode repeats both in a worker with glibc malloc pinned (``*_pinned_malloc``).
sf_adamw_step_vs_floor
    The same step over the time to move its minimal traffic (read and write g, v, y, z:
    32 bytes per element) at the copy bandwidth measured here (``dst.copy_(src)``).
    ``sf_sgd_step_vs_floor`` likewise (g, y, z: 24 bytes per element).
sf_adamw_step_host_vs_upstream
    ``sfdiag.optim.AdamWScheduleFree.step()`` on the 2,000 tiny tensors of
    ``audit_host_us_per_tensor`` (``bench/audit.py``) over the release's foreach path
    (``schedulefree.AdamWScheduleFree(foreach=True)``): the host's cost per tensor of the
    step itself; None where schedulefree is not installed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from harness import (
    Settings,
    interleaved,
    median_ms,
    median_ratio,
    paired_ratio,
    run_worker,
    schedulefree_release,
    sync,
    tiny_grads,
    tiny_tensors,
)


class StepBench:
    """One optimizer over ``tensors`` float32 parameters; ``run()`` times one ``step()``.

    Every optimizer gets bit-identical parameters, and before each step its grads are
    reset (untimed) from one shared source: ``sf-adamw`` overwrites ``p.grad``.
    """

    def __init__(
        self,
        factory: Callable[..., Any],
        base: list[torch.Tensor],
        grads: list[torch.Tensor],
        device: str = "cpu",
    ):
        self.params = [torch.nn.Parameter(b.to(device, copy=True)) for b in base]
        for p in self.params:
            p.grad = torch.empty_like(p)
        self.source = [g.to(device) for g in grads]
        self.device = device
        self.optimizer = factory(self.params)
        self.optimizer.train()

    def run(self) -> float:
        for p, g in zip(self.params, self.source, strict=True):
            p.grad.copy_(g)
        sync(self.device)
        start = time.perf_counter()
        self.optimizer.step()
        sync(self.device)
        return time.perf_counter() - start


class CopyBench:
    """``dst.copy_(src)``: bytes per second, counting the read and the write."""

    def __init__(self, numel: int, device: str = "cpu"):
        self.src = torch.rand(numel, device=device)
        self.dst = torch.empty_like(self.src)
        self.bytes = 2 * self.src.nbytes
        self.device = device

    def run(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.dst.copy_(self.src)
        sync(self.device)
        return time.perf_counter() - start


def _shards(numel: int, tensors: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    size = numel // tensors
    base = [torch.randn(size, generator=gen) for _ in range(tensors)]
    grads = [torch.randn(size, generator=gen).mul_(1e-3) for _ in range(tensors)]
    return base, grads


def measure_sf_adamw_step(settings: Settings, device: str = "cpu") -> dict[str, Any]:
    """sfdiag's sf-adamw step vs the release's two paths, and vs the copy-bandwidth floor."""
    from sfdiag.optim import AdamWScheduleFree

    release = schedulefree_release()
    base, grads = _shards(settings.sf_numel, settings.sf_tensors, seed=1)
    numel = sum(b.numel() for b in base)

    def bench(factory: Callable[..., Any]) -> StepBench:
        return StepBench(factory, base, grads, device)

    benches = {
        "sfdiag": bench(AdamWScheduleFree),
        "sfdiag_per_tensor": bench(lambda p: AdamWScheduleFree(p, foreach=False)),
        # opt-in: one torch.compile-d kernel per tensor (compiled in the warm-up round)
        "sfdiag_compiled": bench(lambda p: AdamWScheduleFree(p, compile=True)),
    }
    if release is not None:
        benches["release_foreach"] = bench(release.AdamWScheduleFree)
        benches["release_per_tensor"] = bench(lambda p: release.AdamWScheduleFree(p, foreach=False))
    contenders: dict[str, Callable[[], float]] = {k: b.run for k, b in benches.items()}
    copy = CopyBench(settings.copy_numel, device)
    contenders["copy"] = copy.run
    times = interleaved(contenders, settings.sf_rounds, warmup=1, seed=1)
    compiled = benches["sfdiag_compiled"].optimizer.param_groups[0]["compile"]
    del benches, contenders

    bandwidth = copy.bytes / statistics.median(times["copy"])
    floor_s = 32 * numel / bandwidth  # read + write g, v, y, z: 8 x 4 bytes per element
    out: dict[str, Any] = {
        "numel": numel,
        "tensors": settings.sf_tensors,
        "ms": {name: median_ms(t) for name, t in times.items() if name != "copy"},
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "floor_ms": round(floor_s * 1e3, 3),
        "vs_floor": round(statistics.median(times["sfdiag"]) / floor_s, 4),
        "per_tensor_vs_floor": round(statistics.median(times["sfdiag_per_tensor"]) / floor_s, 4),
        "compiled": compiled,  # False: torch.compile failed here and the foreach path ran
        "compiled_vs_floor": round(statistics.median(times["sfdiag_compiled"]) / floor_s, 4),
        "rounds": settings.sf_rounds,
    }
    if release is not None:
        out["vs_release_foreach"] = median_ratio(times["sfdiag"], times["release_foreach"])
        out["vs_release_per_tensor"] = median_ratio(times["sfdiag"], times["release_per_tensor"])
        out["vs_release"] = max(out["vs_release_foreach"], out["vs_release_per_tensor"])
        fastest_release = min(
            statistics.median(times["release_foreach"]),
            statistics.median(times["release_per_tensor"]),
        )
        out["compiled_vs_release"] = round(
            statistics.median(times["sfdiag_compiled"]) / fastest_release, 4
        )
    return out


def measure_sf_sgd_step(settings: Settings) -> dict[str, Any]:
    """sfdiag's sf-sgd step (weight decay on, so p.grad is written) vs the release's.

    Its floor: read and write g, y, z (24 bytes per element) at the copy bandwidth.
    """
    from sfdiag.optim import SGDScheduleFree

    release = schedulefree_release()
    base, grads = _shards(settings.sf_numel, settings.sf_tensors, seed=2)
    numel = sum(b.numel() for b in base)
    kw = {"lr": 0.1, "weight_decay": 1e-4}
    benches = {"sfdiag": StepBench(lambda p: SGDScheduleFree(p, **kw), base, grads)}
    if release is not None:
        benches["release_foreach"] = StepBench(
            lambda p: release.SGDScheduleFree(p, **kw), base, grads
        )
        benches["release_per_tensor"] = StepBench(
            lambda p: release.SGDScheduleFree(p, foreach=False, **kw), base, grads
        )
    runs: dict[str, Callable[[], float]] = {k: b.run for k, b in benches.items()}
    copy = CopyBench(settings.copy_numel)
    runs["copy"] = copy.run
    times = interleaved(runs, settings.sf_rounds, seed=2)
    del benches, runs, base, grads
    floor_s = 24 * numel / (copy.bytes / statistics.median(times["copy"]))
    out: dict[str, Any] = {
        "ms": {name: median_ms(t) for name, t in times.items() if name != "copy"},
        "weight_decay": kw["weight_decay"],
        "floor_ms": round(floor_s * 1e3, 3),
        "vs_floor": round(statistics.median(times["sfdiag"]) / floor_s, 4),
    }
    if release is not None:
        out["vs_release_foreach"] = median_ratio(times["sfdiag"], times["release_foreach"])
        out["vs_release_per_tensor"] = median_ratio(times["sfdiag"], times["release_per_tensor"])
        out["vs_release"] = max(out["vs_release_foreach"], out["vs_release_per_tensor"])
    return out


def measure_sf_adamw_host_step(settings: Settings) -> dict[str, Any]:
    """The sf-adamw step on ``tiny_tensors`` (the host's cost per tensor): sfdiag's (and its
    per-tensor path) vs the release's foreach path, interleaved."""
    from sfdiag.optim import AdamWScheduleFree

    release = schedulefree_release()
    base = [
        p.detach().clone()
        for p in tiny_tensors(settings.host_layers, settings.host_width).parameters()
    ]
    grads = tiny_grads(base, seed=3)
    benches = {
        "sfdiag": StepBench(AdamWScheduleFree, base, grads),
        "sfdiag_per_tensor": StepBench(lambda p: AdamWScheduleFree(p, foreach=False), base, grads),
    }
    if release is not None:
        benches["release_foreach"] = StepBench(
            lambda p: release.AdamWScheduleFree(p, foreach=True), base, grads
        )
    times = interleaved(
        {k: b.run for k, b in benches.items()}, settings.host_step_rounds, warmup=2, seed=4
    )
    tensors = len(base)
    out: dict[str, Any] = {
        "tensors": tensors,
        "ms": {name: median_ms(t) for name, t in times.items()},
        "us_per_tensor": {
            name: round(statistics.median(t) / tensors * 1e6, 2) for name, t in times.items()
        },
        "rounds": len(times["sfdiag"]),
        "vs_release_foreach": None,
    }
    if release is not None:
        out["vs_release_foreach"] = median_ratio(times["sfdiag"], times["release_foreach"])
        out["paired_vs_release_foreach"] = paired_ratio(times["sfdiag"], times["release_foreach"])
    return out


# ----------------------------------------------------------------------------- the figures


def step_figures(settings: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    """``sf_adamw_*`` and ``sf_sgd_*`` on large tensors (and again in a worker with glibc
    malloc pinned, where ``pinned_malloc_steps``), in the JSON's order."""
    sf = measure_sf_adamw_step(settings)
    out: dict[str, Any] = {
        "sf_adamw_step_vs_upstream": sf.get("vs_release"),
        "sf_adamw_step_vs_floor": sf["vs_floor"],
        "sf_adamw_compiled_step_vs_upstream": sf.get("compiled_vs_release"),
        "sf_adamw_compiled_step_vs_floor": sf["compiled_vs_floor"],
        "sf_adamw_step": sf,
    }
    sgd = measure_sf_sgd_step(settings)
    out["sf_sgd_step_vs_upstream"] = sgd.get("vs_release")
    out["sf_sgd_step_vs_floor"] = sgd["vs_floor"]
    out["sf_sgd_step"] = sgd
    if settings.pinned_malloc_steps:
        say("optimizer steps, glibc malloc pinned")
        pinned = run_worker(settings, "steps")
        out["sf_adamw_step_pinned_malloc"] = pinned["adamw"]
        out["sf_sgd_step_pinned_malloc"] = pinned["sgd"]
    return out


def steps_worker(settings: Settings) -> dict[str, Any]:
    """The worker of ``*_pinned_malloc`` (``--worker steps``)."""
    return {"adamw": measure_sf_adamw_step(settings), "sgd": measure_sf_sgd_step(settings)}


def host_step_figures(settings: Settings, notes: list[str]) -> dict[str, Any]:
    """``sf_adamw_step_host_vs_upstream`` and its details (a note where there is no release)."""
    host_step = measure_sf_adamw_host_step(settings)
    if schedulefree_release() is None:
        notes.append(
            "schedulefree is not installed: the comparisons with the release are skipped "
            "(pip install 'sfdiag[bench]' or schedulefree==1.4.1)"
        )
    return {
        "sf_adamw_step_host_vs_upstream": host_step["vs_release_foreach"],
        "sf_adamw_step_host": host_step,
    }
