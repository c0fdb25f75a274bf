"""``sfdiag run``'s in-process machinery on training steps: its overhead with the metric
audit, the schedule-free mode watching alone, a long run, a 2-rank DDP job.

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
ddp_audit_overhead_ratio
    The same in a 2-rank DistributedDataParallel job on this machine's CPUs (gloo, through
    torchrun), each rank with half of the batch and sfdiag's channel to the other rank
    (the rank agreement check on audited steps); rank 0 logs to TensorBoard. Rank 0's
    figures.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from harness import (
    ROOT,
    Settings,
    Trainer,
    build_model,
    interleaved,
    make_optimizer,
    median_ms,
    median_ratio,
    paired_ratio,
    run_worker,
    spread,
    worker_args,
)


class ListWriter:
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
        from sfdiag.run import clipping
        from sfdiag.run.metric_names import MetricSelector
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


def open_writer(logdir: str, enabled: bool = True) -> tuple[Any, str]:
    if not enabled:
        return ListWriter(), "none (not rank 0)"
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(logdir), "tensorboard"
    except ImportError:
        return ListWriter(), "none (tensorboard is not installed)"


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
        "ratio": median_ratio(times["audited"], times["plain"]),
        "paired_ratio": paired_ratio(times["audited"], times["plain"]),
        "plain_ms": median_ms(times["plain"]),
        "audited_ms": median_ms(times["audited"]),
        "steps_each": len(times["plain"]) * per_round,
        "metrics_judged": {m.name: (m.verdict, m.steps_judged) for m in metrics},
    }


def measure_metric_audit_overhead(settings: Settings) -> dict[str, Any]:
    """A logged training step with and without ``sfdiag run``'s machinery (module doc)."""
    import tempfile

    torch.manual_seed(0)
    trainer = Trainer.build(build_model(settings.model), "sf-adamw", settings.batch)
    with tempfile.TemporaryDirectory(prefix="sfdiag-bench-tb-") as logdir:
        writer, logger = open_writer(logdir)
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
    step() costs (``MetricAudit._at_log``), median over ``calls``, with grads in place. The
    read kept for the values logged next in a row is dropped before each call: each call
    is a step's first logged value, which reads the grads."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._loss().backward()
    fresh = tuple(True for _ in machinery.watch.watched)
    times = []
    for _ in range(calls):
        for entry in machinery.watch.watched:
            entry.last_read = None
        machinery.audit._unwatched_reads.clear()
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
        writer, _ = open_writer(logdir)
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
        "ratio": median_ratio(times["with"], times["without"]),
        "paired_ratio": paired_ratio(times["with"], times["without"]),
        "without_ms": median_ms(times["without"]),
        "with_ms": median_ms(times["with"]),
        "steps_each": len(times["with"]) * per_round,
        "model": settings.model,
        "batch": settings.batch,
        "optimizer": "sf-adamw",
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
        writer, logger = open_writer(logdir)
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
        "chunk_pair_ratio": spread(pairs(cpu)),
        "wall_ratio": round(sum(wall["audited"]) / sum(wall["plain"]), 4),
        "wall_chunk_pair_ratio": spread(pairs(wall)),
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
        writer, logger = open_writer(logdir, enabled=rank == 0)
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
        *worker_args(settings, "ddp"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"bench ddp job failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the figures


def machinery_figures(settings: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    """``metric_audit_overhead_ratio``, ``run_overhead_ratio_long``,
    ``mode_watch_overhead_ratio``, ``ddp_audit_overhead_ratio`` (each with its details) and
    ``metric_at_log_fraction``, in the JSON's order."""
    out: dict[str, Any] = {}
    # (what, headline key, details key, measurement)
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
    return out
