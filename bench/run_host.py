"""``sfdiag run``'s host time: per tensor on an unaudited step, per logged value.

run_step_host_us_per_tensor
    ``sfdiag run``'s machinery on an unaudited step of the 2,000 tensors of
    ``audit_host_us_per_tensor`` (``bench/audit.py``; sf-adamw; the norms before and after
    ``step()``, the taps, one gradient norm logged to TensorBoard a step and judged):
    rounds of ``host_round_steps`` steps with and without it; the steps ``sfdiag run``
    audits (the first ``AUDIT_FIRST``, then every ``AUDIT_EVERY``-th) run untimed;
    (with - without) / tensors, medians of the rounds' means, in µs. The writer is a
    ``SummaryWriter`` whose ``add_scalar`` only keeps the value, swapped in on the class,
    so that the tap wraps it as it wraps the real one and the real one's own cost is on
    neither side.
run_host_us_per_logged_value
    What one logged gradient norm or learning rate costs ``sfdiag run`` (tap, record,
    judge): ``Linear(4, 1)`` sf-adamw training steps (batch 8) that log 8 values (4 grad
    norms before ``step()``, 4 learning rates after, through that writer) or none, with
    the machinery and without: rounds of the four shuffled, audited steps untimed;
    ((with - without) logging - (with - without) not logging) / 8, in µs: the machinery's
    own cost per step is taken off (``with_minus_without_us_per_value`` in the details
    keeps it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from harness import HostStep, Settings, Trainer, interleaved, median_ms
from run_figures import ListWriter, RunMachinery


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
        writer = stub if stub is not None else ListWriter()

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
        "plain_ms": median_ms(times["plain"]),
        "run_ms": median_ms(times["run"]),
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


# ----------------------------------------------------------------------------- the figures


def host_figures(settings: Settings, notes: list[str]) -> dict[str, Any]:
    """``run_step_host_us_per_tensor`` and ``run_host_us_per_logged_value`` (None, with a
    note, without tensorboard), with their details."""
    run_step = measure_run_step_host(settings)
    logged = measure_logged_value_host(settings)
    if logged is None:
        notes.append("tensorboard is not installed: run_host_us_per_logged_value is skipped")
    return {
        "run_step_host_us_per_tensor": run_step["us_per_tensor"],
        "run_step_host": run_step,
        "run_host_us_per_logged_value": None if logged is None else logged["us_per_value"],
        "run_host_logged_value": logged,
    }
