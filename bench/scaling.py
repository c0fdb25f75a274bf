"""The audit at growing sizes: a fresh worker per size and side (peak RSS), and the 100M figure.

scaling
    Linear(1024, 1024) layers, as many as make 1M, 10M and 100M parameters, batch 8,
    adamw: peak RSS of a fresh subprocess per size, with and without the auditor, and the
    audit's time ratio (interleaved in the audited subprocess) and profiled bytes.
audit_overhead_ratio_100m
    ``scaling``'s audit ratio at 100M parameters (its own worker in ``--quick``), over
    ``m100_pairs`` interleaved pairs of steps.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from audit import measure_audit_memory, measure_audit_overhead, measure_hook_costs
from harness import PINNED_MALLOC, Settings, Trainer, median_ms, run_worker, stacked_linear


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
        "step_ms": median_ms(steps),
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


def scaling_figures(
    settings: Settings, say: Callable[[str], None], notes: list[str]
) -> dict[str, Any]:
    """``scaling`` and ``audit_overhead_ratio_100m`` (from the scaling row at ``m100_size``,
    or its own worker where the sizes stop short of it), with its details."""
    out: dict[str, Any] = {"scaling": run_scaling(settings)}
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
    return out
