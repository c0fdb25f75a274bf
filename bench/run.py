"""sfdiag's performance figures, measured in one process (plus subprocesses where noted).

    python bench/run.py [--quick] [--json] [--threads N]

Every A/B comparison interleaves its runs (A B, then B A, ...; or a seeded shuffle when
more than two take part) and reports medians, so that load from other processes on a
shared machine falls on both sides alike.

Figures (targets in ``TARGETS``):

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
sf_adamw_step_vs_upstream
    ``sfdiag.optim.AdamWScheduleFree.step()`` over the public ``schedulefree`` 1.4.1
    release's ``AdamWScheduleFree.step()`` (the faster of its foreach and per-tensor
    paths), on 25M float32 parameters in 20 tensors. Also SGD (``sf_sgd_step_vs_upstream``).
    Full mode repeats both in a worker with glibc malloc pinned (``*_pinned_malloc``).
sf_adamw_step_vs_floor
    The same step over the time to move its minimal traffic (read and write g, v, y, z:
    32 bytes per element) at the copy bandwidth measured here (``dst.copy_(src)``).
    ``sf_sgd_step_vs_floor`` likewise (g, y, z: 24 bytes per element).
metric_audit_overhead_ratio
    ``sfdiag run``'s whole in-process machinery (the optimizer watch with its sampled
    audits and per-step reference norms, the clipping wrappers, the logger taps and the
    logged-metric audit) on a training step of ``mnist-cnn`` at batch 64 with sf-adamw
    that logs its grad norm to TensorBoard every step, over the same step without it.
    Rounds of steps alternate with and without; the first audited steps (all of the first
    ``AUDIT_FIRST``) are spent in the warm-up, so the sampled audits afterwards count at
    their real rate.
mode_watch_overhead_ratio
    The schedule-free mode watching alone (a global forward pre-hook and a mode check per
    step): ``sfdiag run``'s machinery with it over the same without it, on the steps of
    ``metric_audit_overhead_ratio``.
run_overhead_ratio_long
    ``sfdiag run``'s machinery from a run's first step over a long loop (sf-adamw on
    ``mnist-cnn`` at batch 64, its grad norm logged every 10th step): chunks of
    ``long_chunk`` (5) steps alternate with and without it, ``long_steps`` a side (2,000;
    800 in ``--quick``), in a worker with glibc malloc pinned; total over total, in the
    thread's CPU time (others' jobs on a shared machine move wall time several times more;
    the wall-time ratio is in the details, with the min/median/max of the ratios of the
    pairs of neighbouring chunks in either clock).
audit_overhead_ratio_100m
    ``scaling``'s audit ratio at 100M parameters (its own worker in ``--quick``), over
    ``m100_pairs`` interleaved pairs of steps.
ddp_audit_overhead_ratio
    The same in a 2-rank DistributedDataParallel job on this machine's CPUs (gloo, through
    torchrun), each rank with half of the batch and sfdiag's channel to the other rank
    (the rank agreement check on audited steps); rank 0 logs to TensorBoard. Rank 0's
    figures.
audit_host_us_per_tensor, audit_host_us_per_tensor_mutating
    The auditor's host time per parameter tensor and snapshot: ``step()`` on 1,000
    ``Linear(16, 16)`` (2,000 tensors of 256 or 16 elements, whose grads are filled once
    with seeded ``randn * 1e-3`` and copied back, untimed, before every step) with a
    ``StepAuditor``'s pre- and post-step hooks (as an audited step of ``sfdiag run`` or the
    probe runs them: two snapshots) and without, in interleaved pairs; (audited - plain) /
    (tensors x 2), medians, in µs. torch's AdamW (clean grads), and sfdiag's sf-adamw in
    train mode (``_mutating``: it rewrites every grad, so each is fingerprinted and the
    optimizer's state sampled).
run_step_host_us_per_tensor
    ``sfdiag run``'s machinery on an unaudited step of the same 2,000 tensors (sf-adamw;
    the norms before and after ``step()``, the taps, one gradient norm logged to
    TensorBoard a step and judged): rounds of ``host_round_steps`` steps with and without
    it; the steps ``sfdiag run`` audits (the first ``AUDIT_FIRST``, then every
    ``AUDIT_EVERY``-th) run untimed; (with - without) / tensors, medians of the rounds'
    means, in µs. The writer is a ``SummaryWriter`` whose ``add_scalar`` only keeps the
    value, swapped in on the class, so that the tap wraps it as it wraps the real one and
    the real one's own cost is on neither side.
run_host_us_per_logged_value
    What one logged gradient norm or learning rate costs ``sfdiag run`` (tap, record,
    judge): ``Linear(4, 1)`` sf-adamw training steps (batch 8) that log 8 values (4 grad
    norms before ``step()``, 4 learning rates after, through that writer) or none, with
    the machinery and without: rounds of the four shuffled, audited steps untimed;
    ((with - without) logging - (with - without) not logging) / 8, in µs: the machinery's
    own cost per step is taken off (``with_minus_without_us_per_value`` in the details
    keeps it).
sf_adamw_step_host_vs_upstream
    ``sfdiag.optim.AdamWScheduleFree.step()`` on the same 2,000 tiny tensors over the
    release's foreach path (``schedulefree.AdamWScheduleFree(foreach=True)``): the host's
    cost per tensor of the step itself; None where schedulefree is not installed.
cli_help_seconds, compare_default_seconds
    ``sfdiag --help`` and ``sfdiag compare`` as subprocesses, medians.
scaling
    Linear(1024, 1024) layers, as many as make 1M, 10M and 100M parameters, batch 8,
    adamw: peak RSS of a fresh subprocess per size, with and without the auditor, and the
    audit's time ratio (interleaved in the audited subprocess) and profiled bytes.

``torch.set_num_threads(--threads)`` (default 1) holds in this process and its workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start/stop lines on stderr

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from sfdiag.auditor import StepAuditor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

TARGETS = {
    "audit_overhead_ratio": ("<=", 1.10),
    "audit_extra_memory_fraction": ("<=", 0.01),
    "sf_adamw_step_vs_upstream": ("<=", 1.0),
    "metric_audit_overhead_ratio": ("<=", 1.03),
    "audit_overhead_ratio_100m": ("<=", 1.08),
    "audit_extra_memory_fraction_mutating": ("<=", 0.01),
    "run_overhead_ratio_long": ("<=", 1.02),
    "ddp_audit_overhead_ratio": ("<=", 1.10),
    "mode_watch_overhead_ratio": ("<=", 1.01),
    "metric_at_log_fraction": ("<=", 0.01),
    "audit_host_us_per_tensor": ("<=", 5.0),
    "audit_host_us_per_tensor_mutating": ("<=", 5.0),
    "run_step_host_us_per_tensor": ("<=", 1.0),
    "run_host_us_per_logged_value": ("<=", 10.0),
    "sf_adamw_step_host_vs_upstream": ("<=", 1.0),
    "cli_help_seconds": ("<", 0.5),
    "compare_default_seconds": ("<", 5.0),
}

FIGURES = (
    "audit_overhead_ratio",
    "audit_overhead_ratio_100m",
    "audit_extra_memory_fraction",
    "audit_extra_memory_fraction_mutating",
    "sf_adamw_step_vs_upstream",
    "sf_sgd_step_vs_upstream",
    "sf_adamw_step_vs_floor",
    "sf_adamw_compiled_step_vs_upstream",
    "sf_adamw_compiled_step_vs_floor",
    "sf_sgd_step_vs_floor",
    "metric_audit_overhead_ratio",
    "metric_at_log_fraction",
    "run_overhead_ratio_long",
    "ddp_audit_overhead_ratio",
    "mode_watch_overhead_ratio",
    "audit_host_us_per_tensor",
    "audit_host_us_per_tensor_mutating",
    "run_step_host_us_per_tensor",
    "run_host_us_per_logged_value",
    "sf_adamw_step_host_vs_upstream",
    "cli_help_seconds",
    "compare_default_seconds",
)

_AUDIT_MARK = "sfdiag.bench.audit_hook"

#: glibc malloc with a fixed mmap threshold and no trimming: freed multi-MB temporaries are
#: reused, instead of going back to the OS and being faulted in again (zeroed) at the next
#: step. Which of them glibc returns depends on the process's allocation history, so page
#: faults come and go between otherwise identical steps. Workers run with this.
PINNED_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736"


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions; ``quick_mode()`` and ``tiny()`` (for tests) shrink them."""

    threads: int = 1
    model: str = "mnist-cnn"
    batch: int = 64
    overhead_pairs: int = 60
    sf_numel: int = 25_000_000
    sf_tensors: int = 20
    sf_rounds: int = 15
    copy_numel: int = 1 << 26  # 256 MiB of float32, far beyond any cache
    cli_runs: int = 7
    compare_runs: int = 3
    compare_one_thread: bool = True  # also time compare with OMP_NUM_THREADS=1
    pinned_malloc_steps: bool = True  # also the step comparisons with glibc malloc pinned
    scaling_sizes: tuple[int, ...] = (1_000_000, 10_000_000, 100_000_000)
    scaling_width: int = 1024
    scaling_batch: int = 8
    scaling_pairs: int = 8
    m100_size: int = 100_000_000  # audit_overhead_ratio_100m
    m100_pairs: int = 20
    long_steps: int = 2000  # run_overhead_ratio_long: steps a side ...
    long_chunk: int = 5  # ... in alternating chunks of this many
    # the host's cost per tensor: Linear(host_width, host_width) x host_layers (2 tensors each)
    host_layers: int = 1000
    host_width: int = 16
    host_pairs: int = 30  # audit_host_us_per_tensor*: interleaved pairs of steps
    host_rounds: int = 30  # run_step_host_us_per_tensor: rounds a side ...
    host_round_steps: int = 5  # ... of this many unaudited steps
    host_step_rounds: int = 40  # sf_adamw_step_host_vs_upstream
    value_rounds: int = 80  # run_host_us_per_logged_value: rounds of each of four sides ...
    value_round_steps: int = 20  # ... of this many steps
    logged_values: int = 8  # a step: half grad norms, half learning rates
    quick: bool = False

    @classmethod
    def quick_mode(cls, **kw: Any) -> Settings:
        return replace(
            cls(),
            overhead_pairs=20,
            sf_rounds=5,
            cli_runs=5,
            compare_runs=2,
            scaling_sizes=(1_000_000, 10_000_000),
            scaling_pairs=8,
            long_steps=800,
            host_pairs=15,
            host_rounds=15,
            host_step_rounds=20,
            value_rounds=40,
            pinned_malloc_steps=False,
            quick=True,
            **kw,
        )

    @classmethod
    def tiny(cls, **kw: Any) -> Settings:
        """Seconds, not minutes: every code path, meaningless numbers (tests)."""
        return replace(
            cls(),
            model="mlp",
            batch=8,
            overhead_pairs=2,
            sf_numel=30_000,
            sf_tensors=3,
            sf_rounds=1,
            copy_numel=1 << 16,
            cli_runs=1,
            compare_runs=1,
            compare_one_thread=False,
            scaling_sizes=(20_000,),
            scaling_width=64,
            scaling_pairs=1,
            m100_size=20_000,
            m100_pairs=1,
            long_steps=20,
            long_chunk=10,
            host_layers=10,
            host_pairs=1,
            host_rounds=2,
            host_round_steps=2,
            host_step_rounds=1,
            value_rounds=3,
            value_round_steps=5,
            scaling_batch=2,
            quick=True,
            **kw,
        )


# ----------------------------------------------------------------------------- timing


def interleaved(
    runs: dict[str, Callable[[], float]], rounds: int, *, warmup: int = 1, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per run of each callable (each returns its own timed seconds), interleaved.

    Two callables alternate A B / B A; more are shuffled each round (seeded).
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    names = list(runs)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        if len(names) == 2:
            order = names if i % 2 == 0 else names[::-1]
        else:
            order = rng.sample(names, len(names))
        for name in order:
            times[name].append(runs[name]())
    return times


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 3)


def _ratio(num: list[float], den: list[float]) -> float:
    """The ratio of the medians (the headline figures)."""
    return round(statistics.median(num) / statistics.median(den), 4)


def _paired_ratio(num: list[float], den: list[float]) -> float:
    """The median of the per-round ratios: a cross-check that is blind to slow drifts in load."""
    return round(statistics.median(a / b for a, b in zip(num, den, strict=True)), 4)


# ----------------------------------------------------------------------------- models


def stacked_linear(params: int, width: int = 1024) -> torch.nn.Module:
    """Linear(width, width) layers, ReLU between, as many as make about ``params`` parameters.

    A fixed width keeps every tensor the same size, so the number of tensors (the auditor's
    fixed cost per tensor) grows with the parameters as the per-element work does, and no
    tensor is so large that glibc serves it by mmap (a page fault per page at every step).
    He-initialised, so that activations and grads keep their scale through the depth
    (vanishing values would turn into subnormal floats and slow everything down).
    """
    depth = max(1, round(params / (width * width + width)))
    layers: list[torch.nn.Module] = []
    for i in range(depth):
        layer = torch.nn.Linear(width, width)
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        torch.nn.init.zeros_(layer.bias)
        layers.append(layer)
        if i < depth - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    model.sfdiag_input_shape = (width,)
    model.sfdiag_loss = "mse"
    return model


def build_model(name: str) -> torch.nn.Module:
    from sfdiag import models

    return {"mnist-cnn": models.mnist_cnn, "mlp": models.mlp}[name]()


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params)
    if name == "sf-adamw":
        from sfdiag.optim import AdamWScheduleFree

        opt = AdamWScheduleFree(params)
        opt.train()
        return opt
    raise ValueError(f"unknown optimizer {name!r}")


def _sync(device: Any) -> None:
    """Wait for the device, so that a timer around queued work measures the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Trainer:
    """One model, one optimizer, one fixed batch: ``step()`` times a training step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    target: torch.Tensor
    loss: str
    device: str = "cpu"

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        optimizer: str,
        batch: int,
        seed: int = 0,
        device: str = "cpu",
    ) -> Trainer:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((batch, *model.sfdiag_input_shape), generator=gen)
        model.train()
        if model.sfdiag_loss == "mse":
            target = torch.zeros(batch, model(x[:1]).shape[1])
        else:
            target = torch.randint(0, 10, (batch,), generator=gen)
        model.to(device)
        return cls(
            model,
            make_optimizer(optimizer, model.parameters()),
            x.to(device),
            target.to(device),
            model.sfdiag_loss,
            device,
        )

    def auditor(self) -> StepAuditor:
        return StepAuditor(names={id(p): n for n, p in self.model.named_parameters()})

    def _loss(self) -> torch.Tensor:
        out = self.model(self.x)
        if self.loss == "mse":
            return F.mse_loss(out, self.target)
        if self.loss == "nll":
            return F.nll_loss(out, self.target)
        return F.cross_entropy(out, self.target)

    def step(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self._loss().backward()
        self.optimizer.step()
        _sync(self.device)
        return time.perf_counter() - start

    def audited_step(self, auditor: StepAuditor) -> float:
        auditor.attach(self.optimizer)
        try:
            return self.step()
        finally:
            auditor.detach()
            auditor.observations.clear()

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


# ----------------------------------------------------------------------------- audit figures


def measure_audit_overhead(trainer: Trainer, pairs: int) -> dict[str, Any]:
    """Plain and audited steps of one trainer, interleaved; medians and their ratio."""
    auditor = trainer.auditor()
    times = interleaved(
        {"plain": trainer.step, "audited": lambda: trainer.audited_step(auditor)},
        pairs,
        warmup=3,
    )
    return {
        "ratio": _ratio(times["audited"], times["plain"]),
        "paired_ratio": _paired_ratio(times["audited"], times["plain"]),
        "plain_ms": _median_ms(times["plain"]),
        "audited_ms": _median_ms(times["audited"]),
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
        _sync(trainer.device)
        start = clock()
        fn()
        _sync(trainer.device)
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
    ms = {key: _median_ms(values) for key, values in costs.items()}
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


class _ListWriter:
    """Stands in for SummaryWriter where tensorboard is not installed (untapped)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.values.append(value)

    def close(self) -> None:
        pass


class RunMachinery:
    """``sfdiag run``'s in-process machinery, installed for a round of steps and removed:
    the optimizer watch (with a job's channel, in a rank), clipping wrappers, logger taps
    and the metric audit. Its entries persist, so sampled audits keep their real rate."""

    def __init__(self, job: Any = None, channel: Any = None, *, modes: bool = True) -> None:
        from sfdiag.judge import MetricSelector
        from sfdiag.run import clipping
        from sfdiag.run.metrics import MetricAudit
        from sfdiag.run.modes import ModeWatch
        from sfdiag.run.watch import OptimizerWatch

        self.clips = clipping.ClipLog()
        self.watch = OptimizerWatch(clips=self.clips, job=job, channel=channel)
        self.audit = MetricAudit(self.watch, MetricSelector())
        self.modes = ModeWatch(self.audit.is_active) if modes else None
        self.watch.observers += [self.audit, *([self.modes] if self.modes else [])]

    def run(self, steps: Callable[[], float]) -> float:
        from sfdiag.run import clipping, taps

        self.watch.install()
        if self.modes is not None:
            self.modes.install()
        undo_clips = clipping.install(self.clips, self.audit.is_active)
        remove_taps = taps.install_all(self.audit)
        try:
            return steps()
        finally:
            self.watch.remove()
            if self.modes is not None:
                self.modes.remove()
            undo_clips.undo()
            remove_taps()


def _writer(logdir: str, enabled: bool = True) -> tuple[Any, str]:
    if not enabled:
        return _ListWriter(), "none (not rank 0)"
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(logdir), "tensorboard"
    except ImportError:
        return _ListWriter(), "none (tensorboard is not installed)"


def _logged_steps(trainer: Trainer, writer: Any, counter: list[int]) -> Callable[[int], float]:
    """``count`` training steps that each log the grad norm before ``step()``; s per step."""
    params = list(trainer.model.parameters())

    def steps(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer._loss().backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            writer.add_scalar("train/grad_norm", float(norm), counter[0])
            trainer.optimizer.step()
            counter[0] += 1
        return (time.perf_counter() - start) / count

    return steps


def _machinery_overhead(
    trainer: Trainer, writer: Any, machinery: RunMachinery, rounds: int, per_round: int = 5
) -> dict[str, Any]:
    from sfdiag.run.watch import AUDIT_FIRST

    steps = _logged_steps(trainer, writer, [0])
    machinery.run(lambda: steps(AUDIT_FIRST + 5))  # the every-step audits of the first steps
    times = interleaved(
        {
            "plain": lambda: steps(per_round),
            "audited": lambda: machinery.run(lambda: steps(per_round)),
        },
        rounds,
        warmup=1,
    )
    metrics = machinery.audit.finish()
    return {
        "ratio": _ratio(times["audited"], times["plain"]),
        "paired_ratio": _paired_ratio(times["audited"], times["plain"]),
        "plain_ms": _median_ms(times["plain"]),
        "audited_ms": _median_ms(times["audited"]),
        "steps_each": len(times["plain"]) * per_round,
        "metrics_judged": {m.name: (m.verdict, m.steps_judged) for m in metrics},
    }


def measure_metric_audit_overhead(settings: Settings) -> dict[str, Any]:
    """A logged training step with and without ``sfdiag run``'s machinery (module doc)."""
    import tempfile

    torch.manual_seed(0)
    trainer = Trainer.build(build_model(settings.model), "sf-adamw", settings.batch)
    with tempfile.TemporaryDirectory(prefix="sfdiag-bench-tb-") as logdir:
        writer, logger = _writer(logdir)
        rounds = max(2, settings.overhead_pairs // 2)
        machinery = RunMachinery()
        out = _machinery_overhead(trainer, writer, machinery, rounds)
        at_log = _at_log_seconds(trainer, machinery)
        writer.close()
    return {
        **out,
        # the grads' norm read when a gradient metric is logged mid-step (one fused norm
        # per logging call), over a step without sfdiag
        "at_log_us": round(at_log * 1e6, 1),
        "at_log_fraction": round(at_log / (out["plain_ms"] / 1e3), 5),
        "model": settings.model,
        "batch": settings.batch,
        "optimizer": "sf-adamw",
        "logger": logger,
    }


def _at_log_seconds(trainer: Trainer, machinery: RunMachinery, calls: int = 200) -> float:
    """What reading the grads' norm for a gradient metric logged between backward and
    step() costs (``MetricAudit._at_log``), median over ``calls``, with grads in place."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._loss().backward()
    fresh = tuple(True for _ in machinery.watch.watched)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        machinery.audit._at_log(fresh)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_mode_watch_overhead(settings: Settings) -> dict[str, Any]:
    """The schedule-free mode watching alone: ``sfdiag run``'s machinery with it over the
    same without it (both with the optimizer watch it needs), on sf-adamw training steps."""
    import tempfile

    from sfdiag.run.watch import AUDIT_FIRST

    torch.manual_seed(0)
    trainer = Trainer.build(build_model(settings.model), "sf-adamw", settings.batch)
    with tempfile.TemporaryDirectory(prefix="sfdiag-bench-modes-") as logdir:
        writer, _ = _writer(logdir)
        steps = _logged_steps(trainer, writer, [0])
        with_modes, without = RunMachinery(modes=True), RunMachinery(modes=False)
        for machinery in (with_modes, without):
            machinery.run(lambda: steps(AUDIT_FIRST + 5))
        per_round = 5
        times = interleaved(
            {
                "without": lambda: without.run(lambda: steps(per_round)),
                "with": lambda: with_modes.run(lambda: steps(per_round)),
            },
            max(2, settings.overhead_pairs // 2),
            warmup=1,
        )
        writer.close()
    return {
        "ratio": _ratio(times["with"], times["without"]),
        "paired_ratio": _paired_ratio(times["with"], times["without"]),
        "without_ms": _median_ms(times["without"]),
        "with_ms": _median_ms(times["with"]),
        "steps_each": len(times["with"]) * per_round,
        "model": settings.model,
        "batch": settings.batch,
        "optimizer": "sf-adamw",
    }


def _spread(ratios: list[float]) -> dict[str, float]:
    ordered = sorted(ratios)
    return {
        "min": round(ordered[0], 4),
        "median": round(statistics.median(ordered), 4),
        "max": round(ordered[-1], 4),
    }


def measure_long_run(settings: Settings) -> dict[str, Any]:
    """``sfdiag run`` over a long loop: sf-adamw training steps of mnist-cnn at batch 64
    that log their grad norm to TensorBoard every 10th step, ``long_steps`` with the whole
    machinery (sampled audits, reference norms, taps, modes: one run's worth, from its
    first step) and as many without, in alternating chunks of ``long_chunk`` steps.

    The headline is the ratio of the two sides' total thread CPU time: at a load of 4-12 on
    this shared 2-core machine a pair of 5-step chunks moved by ±4 % in wall time (10th to
    90th percentile), ±2.5 % in CPU time, so that two runs of 1,200 steps a side would
    differ by 0.45 % (one standard deviation) in wall time, 0.16 % in CPU time. Four runs
    of 800 steps a side (2026-12-06, load 1): 1.0166, 1.0159, 1.0143, 1.0143."""
    import tempfile

    torch.manual_seed(0)
    trainer = Trainer.build(build_model(settings.model), "sf-adamw", settings.batch)
    params = list(trainer.model.parameters())
    # per chunk, in order: wall seconds and the thread's CPU seconds
    wall: dict[str, list[float]] = {"plain": [], "audited": []}
    cpu: dict[str, list[float]] = {"plain": [], "audited": []}
    with tempfile.TemporaryDirectory(prefix="sfdiag-bench-long-") as logdir:
        writer, logger = _writer(logdir)
        counters = {"plain": 0, "audited": 0}

        def steps(side: str, count: int) -> float:
            start, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(count):
                trainer.optimizer.zero_grad(set_to_none=True)
                trainer._loss().backward()
                step = counters[side]
                if step % 10 == 0:
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                    writer.add_scalar(f"{side}/grad_norm", float(norm), step)
                trainer.optimizer.step()
                counters[side] += 1
            cpu[side].append(time.thread_time() - start_cpu)
            return time.perf_counter() - start

        machinery = RunMachinery()
        chunk = settings.long_chunk
        for index in range(settings.long_steps // chunk):
            order = ("plain", "audited") if index % 2 == 0 else ("audited", "plain")
            for side in order:
                if side == "plain":
                    wall[side].append(steps(side, chunk))
                else:
                    wall[side].append(machinery.run(lambda: steps("audited", chunk)))
        writer.close()
    metrics = machinery.audit.finish()
    done = counters["plain"]

    def pairs(times: dict[str, list[float]]) -> list[float]:
        """Each pair of neighbouring chunks' ratio (the audited steps fall in a few of them:
        the median is about an unaudited step's overhead)."""
        return [a / p for a, p in zip(times["audited"], times["plain"], strict=True)]

    return {
        "ratio": round(sum(cpu["audited"]) / sum(cpu["plain"]), 4),
        "clock": "thread CPU time",
        "chunk_pair_ratio": _spread(pairs(cpu)),
        "wall_ratio": round(sum(wall["audited"]) / sum(wall["plain"]), 4),
        "wall_chunk_pair_ratio": _spread(pairs(wall)),
        "plain_ms": round(sum(wall["plain"]) / done * 1e3, 3),
        "audited_ms": round(sum(wall["audited"]) / done * 1e3, 3),
        "plain_cpu_ms": round(sum(cpu["plain"]) / done * 1e3, 3),
        "audited_cpu_ms": round(sum(cpu["audited"]) / done * 1e3, 3),
        "chunk_pairs": len(wall["plain"]),
        "chunk_steps": chunk,
        "steps_each": done,
        "audited_steps": len(machinery.watch.watched[0].indices) if machinery.watch.watched else 0,
        "logged_every": 10,
        "logger": logger,
        "metrics_judged": {m.name: (m.verdict, m.steps_judged) for m in metrics},
        "model": settings.model,
        "batch": settings.batch,
        "optimizer": "sf-adamw",
    }


def long_run_worker(settings: Settings) -> dict[str, Any]:
    """``measure_long_run`` in a fresh process with glibc malloc pinned: in this process,
    glibc's giving memory back and faulting it in again moves a step by ±5% from one chunk
    to the next, several times what the machinery costs (bench/RESULTS.md)."""
    return run_worker(settings, "long")


#: the CUDA bench also audits the 100M model at this batch: a step the GPU spends computing,
#: beside batch 8's, which on a GPU is mostly kernel launches
CUDA_LARGE_BATCH = 4096


def measure_cuda(settings: Settings, device: str = "cuda") -> dict[str, Any] | str:
    """The figures on a CUDA device, or "not available" where there is none. (``device``:
    tests run the same code on the CPU, with tiny settings.)"""
    if device == "cuda" and not torch.cuda.is_available():
        return "not available"
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for batch, key in (
        (settings.scaling_batch, "100m"),
        (CUDA_LARGE_BATCH, "100m_large_batch"),
    ):
        torch.manual_seed(0)
        trainer = Trainer.build(
            stacked_linear(settings.m100_size, settings.scaling_width),
            "adamw",
            batch,
            device=device,
        )
        overhead = {
            **measure_audit_overhead(trainer, max(4, settings.scaling_pairs)),
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "tensors": len(list(trainer.model.parameters())),
            "batch": batch,
            "hooks": measure_hook_costs(trainer, 5),
        }
        out[f"audit_overhead_ratio_{key}"] = overhead["ratio"]
        out[f"audit_overhead_{key}"] = overhead
        del trainer
        torch.cuda.empty_cache()
    step = measure_sf_adamw_step(settings, device=device)
    out["sf_adamw_step_vs_upstream"] = step.get("vs_release")
    out["sf_adamw_compiled_step_vs_upstream"] = step.get("compiled_vs_release")
    out["sf_adamw_step"] = step
    cli = _sfdiag_command()
    compare = time_commands(
        {"compare": ([*cli, "compare", "--device", device], {})}, settings.compare_runs
    )["compare"]
    out["compare_cuda_seconds"] = compare["seconds"]
    out["compare_cuda"] = compare
    return out


def ddp_worker(settings: Settings) -> dict[str, Any] | None:
    """One rank of a 2-rank DDP job (gloo): the overhead of ``sfdiag run`` in a rank."""
    import tempfile

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sfdiag.dist import Channel, Job

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    job = Job.from_env()
    channel = Channel.open(job)
    torch.manual_seed(0)
    trainer = Trainer.build(build_model(settings.model), "sf-adamw", settings.batch // world, rank)
    trainer.model = DistributedDataParallel(trainer.model)
    trainer.optimizer = make_optimizer("sf-adamw", trainer.model.parameters())
    with tempfile.TemporaryDirectory(prefix="sfdiag-bench-ddp-") as logdir:
        writer, logger = _writer(logdir, enabled=rank == 0)
        rounds = max(2, settings.overhead_pairs // 2)
        out = _machinery_overhead(trainer, writer, RunMachinery(job, channel), rounds)
        writer.close()
    channel.close()
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return None
    return {
        **out,
        "model": settings.model,
        "global_batch": settings.batch,
        "ranks": world,
        "backend": "gloo",
        "optimizer": "sf-adamw",
        "logger": logger,
    }


def measure_ddp_overhead(settings: Settings) -> dict[str, Any]:
    """``ddp_worker`` on 2 local ranks, through torchrun; rank 0's figures."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(Path(__file__).resolve()),
        "--worker",
        "ddp",
        "--settings",
        json.dumps(asdict(settings)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"bench ddp job failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


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


# ----------------------------------------------------------------------------- optimizer step


def _release() -> Any | None:
    try:
        import schedulefree
    except ImportError:
        return None
    return schedulefree


def _release_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("schedulefree")
    except metadata.PackageNotFoundError:
        return None


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
        _sync(self.device)
        start = time.perf_counter()
        self.optimizer.step()
        _sync(self.device)
        return time.perf_counter() - start


class CopyBench:
    """``dst.copy_(src)``: bytes per second, counting the read and the write."""

    def __init__(self, numel: int, device: str = "cpu"):
        self.src = torch.rand(numel, device=device)
        self.dst = torch.empty_like(self.src)
        self.bytes = 2 * self.src.nbytes
        self.device = device

    def run(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.dst.copy_(self.src)
        _sync(self.device)
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

    release = _release()
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
        "ms": {name: _median_ms(t) for name, t in times.items() if name != "copy"},
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "floor_ms": round(floor_s * 1e3, 3),
        "vs_floor": round(statistics.median(times["sfdiag"]) / floor_s, 4),
        "per_tensor_vs_floor": round(statistics.median(times["sfdiag_per_tensor"]) / floor_s, 4),
        "compiled": compiled,  # False: torch.compile failed here and the foreach path ran
        "compiled_vs_floor": round(statistics.median(times["sfdiag_compiled"]) / floor_s, 4),
        "rounds": settings.sf_rounds,
    }
    if release is not None:
        out["vs_release_foreach"] = _ratio(times["sfdiag"], times["release_foreach"])
        out["vs_release_per_tensor"] = _ratio(times["sfdiag"], times["release_per_tensor"])
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

    release = _release()
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
        "ms": {name: _median_ms(t) for name, t in times.items() if name != "copy"},
        "weight_decay": kw["weight_decay"],
        "floor_ms": round(floor_s * 1e3, 3),
        "vs_floor": round(statistics.median(times["sfdiag"]) / floor_s, 4),
    }
    if release is not None:
        out["vs_release_foreach"] = _ratio(times["sfdiag"], times["release_foreach"])
        out["vs_release_per_tensor"] = _ratio(times["sfdiag"], times["release_per_tensor"])
        out["vs_release"] = max(out["vs_release_foreach"], out["vs_release_per_tensor"])
    return out


# ----------------------------------------------------------------------------- host cost per tensor


def tiny_tensors(layers: int, width: int, seed: int = 0) -> torch.nn.Module:
    """``layers`` Linear(width, width): 2 x ``layers`` tensors of a few hundred elements, on
    which a step's time is the host's fixed cost per tensor (Python, small torch ops)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def _tiny_grads(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Fixed grads as real ones look (randn x 1e-3, seeded), so that a mutated grad's
    fingerprint is fitted as in a real run."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).mul_(1e-3) for p in params]


class HostStep:
    """One optimizer over ``tiny_tensors``; the grads are filled once and copied back,
    untimed, before every step (sf-adamw overwrites them): every step sees the same grads."""

    def __init__(self, optimizer: str, layers: int, width: int, seed: int = 0) -> None:
        self.model = tiny_tensors(layers, width, seed)
        self.params = list(self.model.parameters())
        self.source = _tiny_grads(self.params, seed + 1)
        for p, g in zip(self.params, self.source, strict=True):
            p.grad = g.clone()
        self.optimizer = make_optimizer(optimizer, self.params)

    @property
    def tensors(self) -> int:
        return len(self.params)

    def reset(self) -> None:
        torch._foreach_copy_([p.grad for p in self.params], self.source)

    def step(self) -> float:
        self.reset()
        start = time.perf_counter()
        self.optimizer.step()
        return time.perf_counter() - start


def measure_audit_host(settings: Settings, optimizer: str) -> dict[str, Any]:
    """``step()`` on ``tiny_tensors`` with a ``StepAuditor``'s two hooks and without, in
    interleaved pairs: the audited step's extra time per tensor and snapshot (module doc)."""
    bench = HostStep(optimizer, settings.host_layers, settings.host_width)
    auditor = StepAuditor(names={id(p): n for n, p in bench.model.named_parameters()})
    opt = bench.optimizer
    hooks: dict[str, list[float]] = {"pre": [], "post": []}
    mutated: list[int] = []

    def timed(hook: Callable[..., None], key: str) -> Callable[..., None]:
        def call(optimizer: Any, *args: Any) -> None:
            start = time.perf_counter()
            hook(optimizer, *args)
            hooks[key].append(time.perf_counter() - start)

        return call

    def audited() -> float:
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
    times = interleaved(
        {"plain": bench.step, "audited": audited}, settings.host_pairs, warmup=warmup
    )
    per = bench.tensors * 2  # two snapshots a step: before step() and after
    extra = statistics.median(times["audited"]) - statistics.median(times["plain"])
    paired = statistics.median(a - p for a, p in zip(times["audited"], times["plain"], strict=True))
    return {
        "us_per_tensor": round(extra / per * 1e6, 2),
        "paired_us_per_tensor": round(paired / per * 1e6, 2),
        "plain_ms": _median_ms(times["plain"]),
        "audited_ms": _median_ms(times["audited"]),
        "pre_hook_ms": _median_ms(hooks["pre"][warmup:]),
        "post_hook_ms": _median_ms(hooks["post"][warmup:]),
        "tensors": bench.tensors,
        "snapshots": 2,
        "params_mutated": mutated[-1],
        "pairs": len(times["plain"]),
        "optimizer": optimizer,
    }


class _KeptScalars:
    """What the stub ``SummaryWriter.add_scalar`` kept (``_summary_writer_stub``)."""

    def __init__(self) -> None:
        self.values: list[Any] = []


@contextmanager
def _summary_writer_stub() -> Iterator[Any]:
    """A ``SummaryWriter`` whose ``add_scalar`` only keeps the value: the class's own method
    is swapped for the while, so ``sfdiag run``'s TensorBoard tap wraps it as it wraps the
    real one, and what the real one costs (an event protobuf, a queue) is on neither side.
    None where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import writer as tensorboard
    except ImportError:
        yield None
        return
    cls = tensorboard.SummaryWriter
    kept = _KeptScalars()
    original = vars(cls)["add_scalar"]

    def add_scalar(
        self: Any,
        tag: str,
        scalar_value: Any,
        global_step: Any = None,
        walltime: Any = None,
        new_style: bool = False,
        double_precision: bool = False,
    ) -> None:
        kept.values.append(scalar_value)

    cls.add_scalar = add_scalar
    try:
        yield cls.__new__(cls)  # no __init__: no log directory, no event file
    finally:
        cls.add_scalar = original


def _audited_next(machinery: RunMachinery) -> bool:
    """Whether the next ``step()`` of the (one) watched optimizer is an audited one."""
    from sfdiag.run.watch import audited

    if not machinery.watch.watched:
        return True  # its first step
    entry = machinery.watch.watched[0]
    return audited(entry.started, len(entry.auditor.observations))


def _unaudited_steps(
    one: Callable[[str], float], machinery: RunMachinery
) -> Callable[[str, int], float]:
    """``steps(side, count)``: the mean seconds of ``count`` steps of ``one(side)``; on the
    ``"run"`` side (inside the machinery) an audited step runs untimed, beside them."""

    def steps(side: str, count: int) -> float:
        total, done = 0.0, 0
        while done < count:
            if side.startswith("run") and _audited_next(machinery):
                one(side)
                continue
            total += one(side)
            done += 1
        return total / count

    return steps


def measure_run_step_host(settings: Settings, optimizer: str = "sf-adamw") -> dict[str, Any]:
    """An unaudited step of ``sfdiag run`` on ``tiny_tensors``, a gradient norm logged to
    TensorBoard each step (the stub writer), over the same step without the machinery;
    rounds of ``host_round_steps`` alternate; the extra time per tensor (module doc)."""
    bench = HostStep(optimizer, settings.host_layers, settings.host_width)
    machinery = RunMachinery()
    counters = {"plain": 0, "run": 0}
    with _summary_writer_stub() as stub:
        writer = stub if stub is not None else _ListWriter()

        def one(side: str) -> float:
            bench.reset()
            start = time.perf_counter()
            norm = torch.nn.utils.get_total_norm([p.grad for p in bench.params])
            writer.add_scalar("train/grad_norm", float(norm), counters[side])
            bench.optimizer.step()
            elapsed = time.perf_counter() - start
            counters[side] += 1
            return elapsed

        steps = _unaudited_steps(one, machinery)
        count = settings.host_round_steps
        machinery.run(lambda: steps("run", 1))  # the first AUDIT_FIRST steps, all audited
        times = interleaved(
            {
                "plain": lambda: steps("plain", count),
                "run": lambda: machinery.run(lambda: steps("run", count)),
            },
            settings.host_rounds,
            warmup=1,
        )
    metrics = machinery.audit.finish()
    entry = machinery.watch.watched[0]
    extra = statistics.median(times["run"]) - statistics.median(times["plain"])
    paired = statistics.median(a - p for a, p in zip(times["run"], times["plain"], strict=True))
    return {
        "us_per_tensor": round(extra / bench.tensors * 1e6, 3),
        "paired_us_per_tensor": round(paired / bench.tensors * 1e6, 3),
        "plain_ms": _median_ms(times["plain"]),
        "run_ms": _median_ms(times["run"]),
        "tensors": bench.tensors,
        "steps_each": len(times["plain"]) * count,
        "audited_steps_untimed": len(entry.indices),
        "logger": "tensorboard (stub writer)" if stub is not None else "none (untapped)",
        "metrics_judged": {m.name: (m.verdict, m.steps_judged) for m in metrics},
        "optimizer": optimizer,
    }


def measure_logged_value_host(settings: Settings) -> dict[str, Any] | None:
    """What one logged gradient norm or learning rate costs ``sfdiag run`` (module doc):
    Linear(4, 1) training steps with and without the machinery, logging ``logged_values``
    values a step and none; rounds of the four shuffled. None without tensorboard."""
    with _summary_writer_stub() as writer:
        if writer is None:
            return None
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        model.sfdiag_input_shape = (4,)
        model.sfdiag_loss = "mse"
        trainer = Trainer.build(model, "sf-adamw", 8)
        opt = trainer.optimizer
        params = list(model.parameters())
        norms = [f"run{i}/grad_norm" for i in range(settings.logged_values // 2)]
        rates = [f"run{i}/lr" for i in range(settings.logged_values - len(norms))]
        machinery = RunMachinery()
        counters = {"plain": 0, "run": 0}

        def one(side: str) -> float:
            counter = "run" if side.startswith("run") else "plain"
            log = side.endswith("logging")
            step = counters[counter]
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            trainer._loss().backward()
            if log:  # before step(): the grad norm (as clip_grad_norm_ returns it)
                norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
                for tag in norms:
                    writer.add_scalar(tag, norm, step)
            opt.step()
            if log:  # after it: the learning rate
                rate = opt.param_groups[0]["lr"]
                for tag in rates:
                    writer.add_scalar(tag, rate, step)
            elapsed = time.perf_counter() - start
            counters[counter] += 1
            return elapsed

        steps = _unaudited_steps(one, machinery)
        count = settings.value_round_steps
        machinery.run(lambda: steps("run logging", 1))  # the first AUDIT_FIRST steps
        times = interleaved(
            {
                "plain": lambda: steps("plain", count),
                "plain logging": lambda: steps("plain logging", count),
                "run": lambda: machinery.run(lambda: steps("run", count)),
                "run logging": lambda: machinery.run(lambda: steps("run logging", count)),
            },
            settings.value_rounds,
            warmup=1,
            seed=5,
        )
    metrics = machinery.audit.finish()
    us = {side: statistics.median(t) * 1e6 for side, t in times.items()}
    values = settings.logged_values
    per_step = us["run"] - us["plain"]
    with_logging = us["run logging"] - us["plain logging"]
    return {
        "us_per_value": round((with_logging - per_step) / values, 2),
        "with_minus_without_us_per_value": round(with_logging / values, 2),
        "machinery_us_per_step": round(per_step, 1),
        "step_us": {side: round(v, 1) for side, v in us.items()},
        "values_per_step": values,
        "grad_norms": len(norms),
        "learning_rates": len(rates),
        "steps_each": len(times["plain"]) * count,
        "metrics_judged": {m.name: (m.verdict, m.steps_judged) for m in metrics},
        "model": "Linear(4, 1)",
        "batch": 8,
        "optimizer": "sf-adamw",
        "logger": "tensorboard (stub writer)",
    }


def measure_sf_adamw_host_step(settings: Settings) -> dict[str, Any]:
    """The sf-adamw step on ``tiny_tensors`` (the host's cost per tensor): sfdiag's (and its
    per-tensor path) vs the release's foreach path, interleaved."""
    from sfdiag.optim import AdamWScheduleFree

    release = _release()
    base = [
        p.detach().clone()
        for p in tiny_tensors(settings.host_layers, settings.host_width).parameters()
    ]
    grads = _tiny_grads(base, seed=3)
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
        "ms": {name: _median_ms(t) for name, t in times.items()},
        "us_per_tensor": {
            name: round(statistics.median(t) / tensors * 1e6, 2) for name, t in times.items()
        },
        "rounds": len(times["sfdiag"]),
        "vs_release_foreach": None,
    }
    if release is not None:
        out["vs_release_foreach"] = _ratio(times["sfdiag"], times["release_foreach"])
        out["paired_vs_release_foreach"] = _paired_ratio(times["sfdiag"], times["release_foreach"])
    return out


# ----------------------------------------------------------------------------- CLI


def _sfdiag_command() -> list[str]:
    script = Path(sys.executable).with_name("sfdiag")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sfdiag"]


def time_commands(
    commands: dict[str, tuple[list[str], dict[str, str]]], runs: int
) -> dict[str, dict[str, Any]]:
    """Median wall seconds of each subprocess (output captured), interleaved; last exit codes.

    ``commands``: name -> (argv, extra environment variables).
    """
    codes: dict[str, int] = {}

    def timed(name: str) -> Callable[[], float]:
        args, extra = commands[name]
        env = {**os.environ, **extra}

        def run() -> float:
            start = time.perf_counter()
            done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
            codes[name] = done.returncode
            return time.perf_counter() - start

        return run

    times = interleaved({name: timed(name) for name in commands}, runs, warmup=0, seed=3)
    return {
        name: {"seconds": round(statistics.median(t), 3), "runs": runs, "exit_code": codes[name]}
        for name, t in times.items()
    }


def cli_imports_torch() -> bool:
    code = "import sfdiag.cli, sys; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True"


# ----------------------------------------------------------------------------- scaling


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: ``VmHWM`` of /proc/self/status. ``ru_maxrss`` is no good in a subprocess
    there: the kernel carries the spawning process's peak into the child across
    fork/exec, so every worker would report the (large) parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def scaling_worker(params: int, audit: bool, settings: Settings) -> dict[str, Any]:
    """In a fresh process: steps of a stacked-Linear model, audited or not; peak RSS."""
    torch.manual_seed(0)
    trainer = Trainer.build(
        stacked_linear(params, settings.scaling_width), "adamw", settings.scaling_batch
    )
    auditor = trainer.auditor()
    steps = [trainer.audited_step(auditor) if audit else trainer.step() for _ in range(3)]
    out: dict[str, Any] = {
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "audit": audit,
        "step_ms": _median_ms(steps),
        "max_rss_bytes": peak_rss_bytes(),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if audit:
        overhead = measure_audit_overhead(trainer, scaling_pairs(out["params"], settings))
        out["overhead"] = overhead
        out["hooks"] = measure_hook_costs(trainer, max(3, settings.scaling_pairs))
        out["memory"] = measure_audit_memory(trainer)
    return out


def scaling_pairs(params: int, settings: Settings) -> int:
    """More rounds where steps are short: about 0.4e9 parameter-steps, within 1x..5x the base;
    ``m100_pairs`` at the size ``audit_overhead_ratio_100m`` reads (half-second steps, whose
    median of 8 the neighbours' load moves by ±1 %)."""
    if params >= 0.95 * settings.m100_size:
        return settings.m100_pairs
    base = settings.scaling_pairs
    return max(base, min(5 * base, round(4e8 / max(params, 1))))


def run_worker(settings: Settings, *args: str) -> dict[str, Any]:
    """``bench/run.py --worker ARGS`` in a fresh process with glibc malloc pinned; its JSON."""
    env = dict(os.environ)
    tunables = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{tunables}:{PINNED_MALLOC}" if tunables else PINNED_MALLOC
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        *args,
        "--settings",
        json.dumps(asdict(settings)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_scaling(settings: Settings) -> dict[str, Any]:
    rows = []
    for size in settings.scaling_sizes:
        got = {
            audit: run_worker(settings, "scaling", str(size), str(int(audit)))
            for audit in (False, True)
        }
        plain, audited = got[False], got[True]
        param_bytes = audited["memory"]["param_bytes"]
        rows.append(
            {
                "params": audited["params"],
                "param_mb": round(param_bytes / 2**20, 2),
                "plain_step_ms": audited["overhead"]["plain_ms"],
                "audited_step_ms": audited["overhead"]["audited_ms"],
                "audit_overhead_ratio": audited["overhead"]["ratio"],
                "audit_overhead_paired_ratio": audited["overhead"]["paired_ratio"],
                "hooks": audited.get("hooks"),
                "pairs": audited["overhead"]["runs_each"],
                "audit_peak_bytes": audited["memory"]["peak_bytes"],
                "audit_extra_memory_fraction": audited["memory"]["fraction"],
                "max_rss_plain_mb": round(plain["max_rss_bytes"] / 2**20, 1),
                "max_rss_audited_mb": round(audited["max_rss_bytes"] / 2**20, 1),
                "max_rss_extra_mb": round(
                    (audited["max_rss_bytes"] - plain["max_rss_bytes"]) / 2**20, 1
                ),
            }
        )
    return {
        "model": (
            f"Linear({settings.scaling_width}, {settings.scaling_width}) x depth, "
            f"batch {settings.scaling_batch}, adamw"
        ),
        "malloc": f"GLIBC_TUNABLES={PINNED_MALLOC}",
        "sizes": rows,
    }


# ----------------------------------------------------------------------------- collect


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            caches[f"L{level}"] = size
    memory = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "caches_per_cpu0": caches,
        "memory_gib": memory,
        "torch": torch.__version__,
        "torch_threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "schedulefree": _release_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def collect(settings: Settings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every figure, as one JSON-ready dict."""
    say = progress or (lambda _msg: None)
    torch.set_num_threads(settings.threads)
    notes = [
        f"torch.set_num_threads({settings.threads}) for every in-process measurement and "
        "worker; the CLI subprocesses use torch's default",
        "audit figures: the headline is adamw (clean grads); sf-adamw mutates its grads, so "
        "the auditor also names the kind of mutation (numpy fits: more memory and time)",
        f"workers (scaling, *_pinned_malloc) run with GLIBC_TUNABLES={PINNED_MALLOC}; "
        "peak RSS is VmHWM (ru_maxrss of a subprocess carries the parent's peak on Linux)",
    ]
    out: dict[str, Any] = {"machine": machine_info(settings.threads)}

    say("audit overhead")
    overhead = {}
    memory = {}
    for optimizer in ("adamw", "sf-adamw"):
        torch.manual_seed(0)
        trainer = Trainer.build(build_model(settings.model), optimizer, settings.batch)
        overhead[optimizer] = measure_audit_overhead(trainer, settings.overhead_pairs)
        memory[optimizer] = measure_audit_memory(trainer)
    out["audit_overhead_ratio"] = overhead["adamw"]["ratio"]
    out["audit_overhead"] = {"model": settings.model, "batch": settings.batch, **overhead}
    out["audit_extra_memory_fraction"] = memory["adamw"]["fraction"]
    out["audit_extra_memory_fraction_mutating"] = memory["sf-adamw"]["fraction"]
    out["audit_extra_memory"] = {"model": settings.model, **memory}

    # sfdiag run's machinery: (what, headline key, details key, measurement)
    for what, key, details, measure in (
        ("metric audit overhead", "metric_audit_overhead_ratio", "metric_audit_overhead",
         measure_metric_audit_overhead),
        ("a long run", "run_overhead_ratio_long", "run_overhead_long", long_run_worker),
        ("schedule-free mode watching", "mode_watch_overhead_ratio", "mode_watch_overhead",
         measure_mode_watch_overhead),
        ("a 2-rank DDP job", "ddp_audit_overhead_ratio", "ddp_audit_overhead",
         measure_ddp_overhead),
    ):  # fmt: skip
        say(what)
        figure = measure(settings)
        out[key] = figure["ratio"]
        out[details] = figure
    out["metric_at_log_fraction"] = out["metric_audit_overhead"]["at_log_fraction"]

    say("optimizer steps")
    sf = measure_sf_adamw_step(settings)
    out["sf_adamw_step_vs_upstream"] = sf.get("vs_release")
    out["sf_adamw_step_vs_floor"] = sf["vs_floor"]
    out["sf_adamw_compiled_step_vs_upstream"] = sf.get("compiled_vs_release")
    out["sf_adamw_compiled_step_vs_floor"] = sf["compiled_vs_floor"]
    out["sf_adamw_step"] = sf
    sgd = measure_sf_sgd_step(settings)
    out["sf_sgd_step_vs_upstream"] = sgd.get("vs_release")
    out["sf_sgd_step_vs_floor"] = sgd["vs_floor"]
    out["sf_sgd_step"] = sgd
    if settings.pinned_malloc_steps:
        say("optimizer steps, glibc malloc pinned")
        pinned = run_worker(settings, "steps")
        out["sf_adamw_step_pinned_malloc"] = pinned["adamw"]
        out["sf_sgd_step_pinned_malloc"] = pinned["sgd"]

    say("the host's cost per tensor")
    host = {name: measure_audit_host(settings, name) for name in ("adamw", "sf-adamw")}
    out["audit_host_us_per_tensor"] = host["adamw"]["us_per_tensor"]
    out["audit_host_us_per_tensor_mutating"] = host["sf-adamw"]["us_per_tensor"]
    out["audit_host"] = {
        "model": f"Linear({settings.host_width}, {settings.host_width}) x {settings.host_layers}",
        **host,
    }
    run_step = measure_run_step_host(settings)
    out["run_step_host_us_per_tensor"] = run_step["us_per_tensor"]
    out["run_step_host"] = run_step
    logged = measure_logged_value_host(settings)
    out["run_host_us_per_logged_value"] = None if logged is None else logged["us_per_value"]
    out["run_host_logged_value"] = logged
    if logged is None:
        notes.append("tensorboard is not installed: run_host_us_per_logged_value is skipped")
    host_step = measure_sf_adamw_host_step(settings)
    out["sf_adamw_step_host_vs_upstream"] = host_step["vs_release_foreach"]
    out["sf_adamw_step_host"] = host_step
    if _release() is None:
        notes.append(
            "schedulefree is not installed: the comparisons with the release are skipped "
            "(pip install 'sfdiag[bench]' or schedulefree==1.4.1)"
        )

    say("CLI")
    cli = _sfdiag_command()
    help_run = time_commands({"help": ([*cli, "--help"], {})}, settings.cli_runs)["help"]
    # Beside the default, the same compare with one intra-op thread: on a busy 2-core
    # machine torch's default (one thread per core) spends its time waiting on the other.
    compares = {"default": ([*cli, "compare"], {})}
    if settings.compare_one_thread:
        compares["one_thread"] = ([*cli, "compare"], {"OMP_NUM_THREADS": "1"})
    compare = time_commands(compares, settings.compare_runs)
    out["cli_help_seconds"] = help_run["seconds"]
    out["compare_default_seconds"] = compare["default"]["seconds"]
    out["cli"] = {
        "command": " ".join(Path(c).name for c in cli),
        "help": help_run,
        "compare": compare["default"],
        "compare_one_thread": compare.get("one_thread"),
        "cli_imports_torch": cli_imports_torch(),
    }

    say("scaling")
    out["scaling"] = run_scaling(settings)
    if settings.quick and 100_000_000 not in settings.scaling_sizes:
        notes.append("--quick: scaling stops at 10M parameters (100M in the full run)")
    big = next(
        (row for row in out["scaling"]["sizes"] if row["params"] >= 0.95 * settings.m100_size),
        None,
    )
    if big is None:
        say(f"audit overhead at {settings.m100_size:,} parameters")
        got = run_worker(settings, "scaling", str(settings.m100_size), "1")
        big = {"params": got["params"], "audit_overhead_ratio": got["overhead"]["ratio"], **got}
    out["audit_overhead_ratio_100m"] = big["audit_overhead_ratio"]
    out["audit_overhead_100m"] = {
        "params": big["params"],
        "ratio": big["audit_overhead_ratio"],
        "hooks": big.get("hooks"),
    }

    say("CUDA")
    out["cuda"] = measure_cuda(settings)

    out["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    out["targets"] = {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}
    out["met"] = {k: _meets(k, out.get(k)) for k in TARGETS}
    out["settings"] = asdict(settings)
    out["notes"] = notes
    return out


def _meets(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, target = TARGETS[key]
    return value <= target if op == "<=" else value < target


# ----------------------------------------------------------------------------- output


def render(figures: dict[str, Any]) -> str:
    """A readable table of the headline figures, then the details that explain them."""
    lines = []
    m = figures["machine"]
    lines.append(
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['torch_threads']} thread(s), "
        f"schedulefree {m['schedulefree'] or 'not installed'}"
    )
    lines.append("")
    lines.append(f"{'figure':34} {'value':>10}  {'target':>8}  met")
    for key in FIGURES:
        value = figures.get(key)
        target = figures["targets"].get(key, "")
        met = figures["met"].get(key)
        shown = "skipped" if value is None else f"{value:.4g}"
        flag = "" if met is None else ("yes" if met else "NO")
        lines.append(f"{key:34} {shown:>10}  {target:>8}  {flag}")
    lines.append("")
    ao = figures["audit_overhead"]
    for name in ("adamw", "sf-adamw"):
        o, mem = ao[name], figures["audit_extra_memory"][name]
        lines.append(
            f"audit, {ao['model']} batch {ao['batch']}, {name}: {o['plain_ms']:.2f} -> "
            f"{o['audited_ms']:.2f} ms/step (x{o['ratio']:.3f}); peak {mem['peak_bytes']} B "
            f"= {mem['fraction']:.4f} of {mem['param_bytes']} B of parameters"
        )
    ma = figures["metric_audit_overhead"]
    lines.append(
        f"sfdiag run machinery, {ma['model']} batch {ma['batch']}, {ma['optimizer']}, a grad "
        f"norm logged every step ({ma['logger']}): {ma['plain_ms']:.2f} -> "
        f"{ma['audited_ms']:.2f} ms/step (x{ma['ratio']:.3f}, paired x{ma['paired_ratio']:.3f}); "
        f"the norm read at a mid-step log {ma['at_log_us']:.0f} us ({ma['at_log_fraction']:.4f} "
        "of a step)"
    )
    mw = figures["mode_watch_overhead"]
    lines.append(
        f"schedule-free mode watching, {mw['model']} batch {mw['batch']}, {mw['optimizer']}: "
        f"{mw['without_ms']:.2f} -> {mw['with_ms']:.2f} ms/step (x{mw['ratio']:.3f}, paired "
        f"x{mw['paired_ratio']:.3f})"
    )
    dd = figures["ddp_audit_overhead"]
    lines.append(
        f"sfdiag run in a {dd['ranks']}-rank DDP job ({dd['backend']}), {dd['model']} global "
        f"batch {dd['global_batch']}, {dd['optimizer']}: {dd['plain_ms']:.2f} -> "
        f"{dd['audited_ms']:.2f} ms/step (x{dd['ratio']:.3f}, paired x{dd['paired_ratio']:.3f})"
    )
    sf = figures["sf_adamw_step"]
    ms = ", ".join(f"{k} {v:.1f}" for k, v in sf["ms"].items())
    lines.append(
        f"sf-adamw step, {sf['numel'] / 1e6:.0f}M params in {sf['tensors']} tensors (ms): {ms}; "
        f"floor {sf['floor_ms']:.1f} ms at {sf['copy_bandwidth_gb_s']} GB/s"
    )
    sgd = figures["sf_sgd_step"]
    ms = ", ".join(f"{k} {v:.1f}" for k, v in sgd["ms"].items())
    lines.append(
        f"sf-sgd step, weight decay {sgd['weight_decay']} (ms): {ms}; "
        f"floor {sgd['floor_ms']:.1f} ms"
    )
    for name in ("sf_adamw_step_pinned_malloc", "sf_sgd_step_pinned_malloc"):
        pinned = figures.get(name)
        if pinned:
            ms = ", ".join(f"{k} {v:.1f}" for k, v in pinned["ms"].items())
            lines.append(
                f"{name} (ms): {ms}; vs release {pinned.get('vs_release')}, "
                f"vs floor {pinned['vs_floor']}"
            )
    ah = figures["audit_host"]
    for name in ("adamw", "sf-adamw"):
        o = ah[name]
        lines.append(
            f"the auditor on {o['tensors']} tiny tensors ({ah['model']}), {name}: "
            f"{o['plain_ms']:.2f} -> {o['audited_ms']:.2f} ms/step (hooks {o['pre_hook_ms']:.2f}"
            f" + {o['post_hook_ms']:.2f} ms, {o['params_mutated']} grads mutated): "
            f"{o['us_per_tensor']:.2f} us per tensor and snapshot"
        )
    rs = figures["run_step_host"]
    lines.append(
        f"sfdiag run, an unaudited step on the same {rs['tensors']} tensors, {rs['optimizer']}, "
        f"a grad norm logged ({rs['logger']}): {rs['plain_ms']:.2f} -> {rs['run_ms']:.2f} "
        f"ms/step: {rs['us_per_tensor']:.2f} us per tensor"
    )
    lv = figures["run_host_logged_value"]
    if lv:
        lines.append(
            f"sfdiag run, one logged value ({lv['grad_norms']} grad norms and "
            f"{lv['learning_rates']} rates a step, {lv['model']}, {lv['optimizer']}): "
            f"{lv['us_per_value']:.1f} us (beside the machinery's {lv['machinery_us_per_step']:.0f}"
            f" us a step; both over the values: {lv['with_minus_without_us_per_value']:.1f} us)"
        )
    hs = figures["sf_adamw_step_host"]
    ms = ", ".join(f"{k} {v:.2f}" for k, v in hs["ms"].items())
    lines.append(f"sf-adamw step on the same {hs['tensors']} tensors (ms): {ms}")
    cli = figures["cli"]
    one = cli["compare_one_thread"]
    lines.append(
        f"sfdiag compare: {cli['compare']['seconds']:.2f} s with torch's default threads"
        + (f", {one['seconds']:.2f} s with OMP_NUM_THREADS=1" if one else "")
        + f"; 'import sfdiag.cli' imports torch: {cli['cli_imports_torch']}"
    )
    lines.append("")
    lines.append(f"scaling: {figures['scaling']['model']}, {figures['scaling']['malloc']}")
    lines.append(
        f"{'params':>12} {'step ms':>9} {'audited':>9} {'ratio':>7} {'audit B':>9} "
        f"{'RSS MB':>8} {'+audit':>8}"
    )
    for row in figures["scaling"]["sizes"]:
        lines.append(
            f"{row['params']:>12,} {row['plain_step_ms']:>9.2f} {row['audited_step_ms']:>9.2f} "
            f"{row['audit_overhead_ratio']:>7.3f} {row['audit_peak_bytes']:>9} "
            f"{row['max_rss_plain_mb']:>8.1f} {row['max_rss_extra_mb']:>+8.1f}"
        )
    hooks = figures["audit_overhead_100m"].get("hooks")
    if hooks:
        lines.append(
            f"at {figures['audit_overhead_100m']['params']:,} parameters, thread CPU time: "
            f"pre-step hook {hooks['pre_hook_ms']:.1f} ms, post-step {hooks['post_hook_ms']:.1f}, "
            f"one plain read of the grads {hooks['grad_read_ms']:.1f}, a step "
            f"{hooks['step_ms']:.1f}: hooks x{hooks['hooks_over_step']:.3f} of the step, two "
            f"plain reads alone x{hooks['two_reads_over_step']:.3f}"
        )
    long_run = figures["run_overhead_long"]
    pairs, wall_pairs = long_run["chunk_pair_ratio"], long_run["wall_chunk_pair_ratio"]
    lines.append(
        f"a long sfdiag run: {long_run['steps_each']} steps a side ({long_run['audited_steps']} "
        f"audited) in {long_run['chunk_pairs']} pairs of {long_run['chunk_steps']}-step chunks, "
        f"grad norm logged every {long_run['logged_every']}: {long_run['plain_cpu_ms']:.2f} -> "
        f"{long_run['audited_cpu_ms']:.2f} ms/step in thread CPU time (x{long_run['ratio']:.4f}; "
        f"pairs {pairs['min']:.3f} / {pairs['median']:.3f} / {pairs['max']:.3f}), "
        f"{long_run['plain_ms']:.2f} -> {long_run['audited_ms']:.2f} in wall time "
        f"(x{long_run['wall_ratio']:.4f}; pairs {wall_pairs['min']:.3f} / "
        f"{wall_pairs['median']:.3f} / {wall_pairs['max']:.3f})"
    )
    lines.append(render_cuda(figures["cuda"]))
    lines.append("")
    lines.extend(f"note: {note}" for note in figures["notes"])
    return "\n".join(lines)


def _cuda_overhead_line(overhead: dict[str, Any]) -> str:
    hooks = overhead["hooks"]
    return (
        f"  audit overhead at {overhead['params']:,} parameters, batch {overhead['batch']}: "
        f"x{overhead['ratio']:.3f} (step {overhead['plain_ms']:.2f} ms; hooks "
        f"{hooks['pre_hook_ms']:.2f} + {hooks['post_hook_ms']:.2f} ms, one plain read "
        f"{hooks['grad_read_ms']:.2f} ms)"
    )


def render_cuda(cuda: dict[str, Any] | str) -> str:
    if isinstance(cuda, str):
        return f"cuda: {cuda}"
    step = cuda["sf_adamw_step"]
    ms = ", ".join(f"{k} {v:.2f}" for k, v in step["ms"].items())
    return "\n".join(
        [
            f"cuda: {cuda['device']}",
            _cuda_overhead_line(cuda["audit_overhead_100m"]),
            _cuda_overhead_line(cuda["audit_overhead_100m_large_batch"]),
            f"  sf-adamw step (ms): {ms}; vs release {step.get('vs_release')}, compiled vs "
            f"release {step.get('compiled_vs_release')}",
            f"  sfdiag compare --device cuda: {cuda['compare_cuda_seconds']:.2f} s",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no 100M")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: only the CUDA figures (skipped, with a message, where there is no GPU)",
    )
    # internal: one measurement in a fresh process (run_worker)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        settings = Settings(**json.loads(args.settings))
        torch.set_num_threads(settings.threads)
        kind, *rest = args.worker
        if kind == "scaling":
            result = scaling_worker(int(rest[0]), bool(int(rest[1])), settings)
        elif kind == "ddp":
            result = ddp_worker(settings)
            if result is None:  # not rank 0
                return 0
        elif kind == "long":
            result = measure_long_run(settings)
        else:
            result = {
                "adamw": measure_sf_adamw_step(settings),
                "sgd": measure_sf_sgd_step(settings),
            }
        print(json.dumps(result))
        return 0

    settings = Settings.quick_mode() if args.quick else Settings()
    settings = replace(settings, threads=args.threads)

    def progress(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    if args.device == "cuda":
        torch.set_num_threads(settings.threads)
        cuda = measure_cuda(settings)
        if isinstance(cuda, str):
            print("[bench] no CUDA device here: the CUDA figures are skipped", file=sys.stderr)
        print(json.dumps({"cuda": cuda}, indent=2) if args.json else render_cuda(cuda))
        return 0
    figures = collect(settings, progress)
    print(json.dumps(figures, indent=2) if args.json else render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
