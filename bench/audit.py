"""The auditor's figures: its overhead on a training step, its hooks' costs, the memory it
allocates, its host time per tensor.

audit_overhead_ratio
    A training step (zero_grad, forward, backward, ``step()``) of ``mnist-cnn`` at batch
    64 with a ``StepAuditor`` attached (the default in-place detection, as the probe
    runs it) over the same step without it. The same model and optimizer alternate
    between attached and detached, so both sides see the same memory and caches. The
    headline is ``adamw``; ``sf-adamw`` (which mutates ``p.grad``, so the auditor also
    names the kind of mutation) is reported beside it.
audit_extra_memory_fraction
    The peak bytes the auditor allocates during one step, over the parameters' bytes:
    torch allocations made inside the step hooks (the profiler's memory events between
    the hooks' start and end; what ``pre_step`` leaves pending is carried through the
    step) plus the Python and numpy allocations of the hooks (``tracemalloc``).
audit_host_us_per_tensor, audit_host_us_per_tensor_mutating
    The auditor's host time per parameter tensor and snapshot: ``step()`` on 1,000
    ``Linear(16, 16)`` (2,000 tensors of 256 or 16 elements, whose grads are filled once
    with seeded ``randn * 1e-3`` and copied back, untimed, before every step) with a
    ``StepAuditor``'s pre- and post-step hooks (as an audited step of ``sfdiag run`` or the
    probe runs them: two snapshots) and without, in interleaved pairs; (audited - plain) /
    (tensors x 2), medians, in µs. torch's AdamW (clean grads), and sfdiag's sf-adamw in
    train mode (``_mutating``: it rewrites every grad, so each is fingerprinted and the
    optimizer's state sampled). The details add the same from the means
    (``mean_us_per_tensor``: what a run pays, the garbage collector's full collections
    included) and those collections on each side (``full_collections``).
"""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import torch
from harness import (
    HostStep,
    Settings,
    Trainer,
    build_model,
    interleaved,
    median_ms,
    median_ratio,
    paired_ratio,
    sync,
)

from sfdiag.step_audit.auditor import StepAuditor

_AUDIT_MARK = "sfdiag.bench.audit_hook"


def measure_audit_overhead(trainer: Trainer, pairs: int) -> dict[str, Any]:
    """Plain and audited steps of one trainer, interleaved; medians and their ratio."""
    auditor = trainer.auditor()
    times = interleaved(
        {"plain": trainer.step, "audited": lambda: trainer.audited_step(auditor)},
        pairs,
        warmup=3,
    )
    return {
        "ratio": median_ratio(times["audited"], times["plain"]),
        "paired_ratio": paired_ratio(times["audited"], times["plain"]),
        "plain_ms": median_ms(times["plain"]),
        "audited_ms": median_ms(times["audited"]),
        "runs_each": len(times["plain"]),
    }


def measure_hook_costs(trainer: Trainer, rounds: int) -> dict[str, Any]:
    """The time of the auditor's two hooks, of one plain read of every grad
    (``_foreach_norm``: the floor is two such reads) and of a whole step without the auditor;
    medians over ``rounds`` steps after a warm-up. On the CPU thread CPU time (less moved by
    other jobs than wall time); on CUDA wall time, the device idle before and after each."""
    auditor = trainer.auditor()
    opt = trainer.optimizer
    params = auditor.params_of(opt)
    on_cpu = torch.device(trainer.device).type == "cpu"
    clock = time.thread_time if on_cpu else time.perf_counter

    def timed(fn: Callable[[], Any]) -> float:
        sync(trainer.device)
        start = clock()
        fn()
        sync(trainer.device)
        return clock() - start

    costs: dict[str, list[float]] = {"pre": [], "post": [], "read": [], "step": []}
    for round_ in range(rounds + 1):
        opt.zero_grad(set_to_none=True)
        trainer._loss().backward()
        read = timed(lambda: torch._foreach_norm([p.grad for p in params if p.grad is not None]))
        pre = timed(lambda: auditor.pre_step(opt))
        opt.step()
        post = timed(lambda: auditor.post_step(opt))
        auditor.observations.clear()
        step = timed(trainer.step)
        if round_:
            for key, value in zip(costs, (pre, post, read, step), strict=True):
                costs[key].append(value)
    ms = {key: median_ms(values) for key, values in costs.items()}
    return {
        "pre_hook_ms": ms["pre"],
        "post_hook_ms": ms["post"],
        "grad_read_ms": ms["read"],
        "step_ms": ms["step"],
        "hooks_over_step": round(1 + (ms["pre"] + ms["post"]) / ms["step"], 4),
        "two_reads_over_step": round(1 + 2 * ms["read"] / ms["step"], 4),
        "rounds": rounds,
        "clock": "thread CPU time" if on_cpu else "wall time",
    }


def _torch_bytes_in_marks(prof: Any) -> tuple[int, int]:
    """(peak, held between the hooks) of torch allocations inside the marked hook calls."""
    events = list(prof.profiler.kineto_results.events())
    windows = sorted((e.start_ns(), e.end_ns()) for e in events if e.name() == _AUDIT_MARK)
    memory = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.nbytes()
    )
    live = peak = 0
    held = None
    for i, (start, end) in enumerate(windows):
        for t, nbytes in memory:
            if start <= t <= end:
                live += nbytes
                peak = max(peak, live)
        if i == 0:
            held = live
    return peak, held or 0


def measure_audit_memory(trainer: Trainer) -> dict[str, Any]:
    """Bytes the auditor allocates in one step (peak), measured, over the parameters' bytes."""
    from torch.profiler import ProfilerActivity, profile, record_function

    auditor = trainer.auditor()
    python: dict[str, tuple[int, int, int]] = {}

    def marked(hook: Callable[..., None], label: str) -> Callable[..., None]:
        def call(optimizer: Any, *args: Any) -> None:
            with record_function(_AUDIT_MARK):
                before, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                hook(optimizer, *args)
                current, peak = tracemalloc.get_traced_memory()
            python[label] = (before, current, peak)

        return call

    opt = trainer.optimizer
    for _ in range(2):  # state created, allocator warm
        trainer.audited_step(auditor)
    handles = [
        opt.register_step_pre_hook(marked(auditor.pre_step, "pre")),
        opt.register_step_post_hook(marked(auditor.post_step, "post")),
    ]
    opt.zero_grad(set_to_none=True)  # free the old grads before the profiler starts
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.step()
    finally:
        if started_tracing:
            tracemalloc.stop()
        for handle in handles:
            handle.remove()
    assert len(auditor.observations) == 1, "the auditor did not observe the profiled step"
    torch_peak, torch_held = _torch_bytes_in_marks(prof)
    pre_before, pre_after, pre_peak = python["pre"]
    post_before, _, post_peak = python["post"]
    python_held = max(0, pre_after - pre_before)
    python_peak = max(pre_peak - pre_before, python_held + post_peak - post_before)
    peak = torch_peak + python_peak
    return {
        "fraction": round(peak / trainer.param_bytes, 5),
        "peak_bytes": peak,
        "torch_peak_bytes": torch_peak,
        "torch_held_during_step_bytes": torch_held,
        "python_peak_bytes": python_peak,
        "param_bytes": trainer.param_bytes,
        "tensors": len(list(trainer.model.parameters())),
    }


def measure_audit_host(settings: Settings, optimizer: str) -> dict[str, Any]:
    """``step()`` on ``tiny_tensors`` with a ``StepAuditor``'s two hooks and without, in
    interleaved pairs: the audited step's extra time per tensor and snapshot (module doc)."""
    bench = HostStep(optimizer, settings.host_layers, settings.host_width)
    auditor = StepAuditor(names={id(p): n for n, p in bench.model.named_parameters()})
    opt = bench.optimizer
    hooks: dict[str, list[float]] = {"pre": [], "post": []}
    mutated: list[int] = []
    full_collections = {"plain": 0, "audited": 0}
    side = ["plain"]

    def count_full(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            full_collections[side[0]] += 1

    def timed(hook: Callable[..., None], key: str) -> Callable[..., None]:
        def call(optimizer: Any, *args: Any) -> None:
            start = time.perf_counter()
            hook(optimizer, *args)
            hooks[key].append(time.perf_counter() - start)

        return call

    def plain() -> float:
        side[0] = "plain"
        return bench.step()

    def audited() -> float:
        side[0] = "audited"
        bench.reset()
        handles = [
            opt.register_step_pre_hook(timed(auditor.pre_step, "pre")),
            opt.register_step_post_hook(timed(auditor.post_step, "post")),
        ]
        try:
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
        finally:
            for handle in handles:
                handle.remove()
        mutated.append(auditor.observations[-1].params_mutated)
        auditor.observations.clear()
        return elapsed

    warmup = 2  # the first audited step samples every parameter; the later ones as in a run
    gc.callbacks.append(count_full)
    try:
        times = interleaved(
            {"plain": plain, "audited": audited}, settings.host_pairs, warmup=warmup
        )
    finally:
        gc.callbacks.remove(count_full)
    per = bench.tensors * 2  # two snapshots a step: before step() and after
    extra = statistics.median(times["audited"]) - statistics.median(times["plain"])
    extra_mean = statistics.fmean(times["audited"]) - statistics.fmean(times["plain"])
    paired = statistics.median(a - p for a, p in zip(times["audited"], times["plain"], strict=True))
    return {
        "us_per_tensor": round(extra / per * 1e6, 2),
        "paired_us_per_tensor": round(paired / per * 1e6, 2),
        "mean_us_per_tensor": round(extra_mean / per * 1e6, 2),
        "full_collections": full_collections,
        "plain_ms": median_ms(times["plain"]),
        "audited_ms": median_ms(times["audited"]),
        "pre_hook_ms": median_ms(hooks["pre"][warmup:]),
        "post_hook_ms": median_ms(hooks["post"][warmup:]),
        "tensors": bench.tensors,
        "snapshots": 2,
        "params_mutated": mutated[-1],
        "pairs": len(times["plain"]),
        "optimizer": optimizer,
    }


# ----------------------------------------------------------------------------- the figures


def audit_figures(settings: Settings) -> dict[str, Any]:
    """``audit_overhead_ratio`` and ``audit_extra_memory_fraction[_mutating]``, with their
    details, in the JSON's order."""
    overhead = {}
    memory = {}
    for optimizer in ("adamw", "sf-adamw"):
        torch.manual_seed(0)
        trainer = Trainer.build(build_model(settings.model), optimizer, settings.batch)
        overhead[optimizer] = measure_audit_overhead(trainer, settings.overhead_pairs)
        memory[optimizer] = measure_audit_memory(trainer)
    return {
        "audit_overhead_ratio": overhead["adamw"]["ratio"],
        "audit_overhead": {"model": settings.model, "batch": settings.batch, **overhead},
        "audit_extra_memory_fraction": memory["adamw"]["fraction"],
        "audit_extra_memory_fraction_mutating": memory["sf-adamw"]["fraction"],
        "audit_extra_memory": {"model": settings.model, **memory},
    }


def host_figures(settings: Settings) -> dict[str, Any]:
    """``audit_host_us_per_tensor[_mutating]`` and their details."""
    host = {name: measure_audit_host(settings, name) for name in ("adamw", "sf-adamw")}
    width = settings.host_width
    return {
        "audit_host_us_per_tensor": host["adamw"]["us_per_tensor"],
        "audit_host_us_per_tensor_mutating": host["sf-adamw"]["us_per_tensor"],
        "audit_host": {"model": f"Linear({width}, {width}) x {settings.host_layers}", **host},
    }
