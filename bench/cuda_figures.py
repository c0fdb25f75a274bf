"""The figures on a CUDA device (``bench/run.py --device cuda``; ``bash bench/cuda_check.sh``).

The audit's overhead at ``m100_size`` parameters (a ``stacked_linear`` model, adamw) at
batch ``scaling_batch`` and at ``CUDA_LARGE_BATCH``, with its hooks' costs; the sf-adamw
step against the release's; ``sfdiag compare --device cuda``.
"""

from __future__ import annotations

from typing import Any

import torch
from audit import measure_audit_overhead, measure_hook_costs
from cli_figures import sfdiag_command, time_commands
from harness import Settings, Trainer, stacked_linear
from optimizers import measure_sf_adamw_step

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
    cli = sfdiag_command()
    compare = time_commands(
        {"compare": ([*cli, "compare", "--device", device], {})}, settings.compare_runs
    )["compare"]
    out["compare_cuda_seconds"] = compare["seconds"]
    out["compare_cuda"] = compare
    return out
