"""Where the auditor's two hooks spend their time on the bench's Linear stack.

    python bench/profile_hooks.py [--device cuda] [--params 100000000] [--batch 8]

Prints, for a few audited steps after a warm-up: the Python functions by own time
(cProfile) and torch's ops by self CPU time (and CUDA time on a GPU), within the hooks
only. What bench/run.py's ratios cannot say: which part of a hook to make cheaper.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Trainer, stacked_linear, sync  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = stacked_linear(args.params, args.width)
    trainer = Trainer.build(model, "adamw", args.batch, device=args.device)
    auditor = trainer.auditor()
    opt = trainer.optimizer
    profiler = cProfile.Profile()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def hook_call(hook: Any, profiled: bool) -> None:
        if profiled:
            profiler.enable()
        with torch.profiler.record_function(f"sfdiag.{hook.__name__}"):
            hook(opt)
            sync(args.device)  # the hook's device work counts as the hook's
        if profiled:
            profiler.disable()

    def audited_step(profiled: bool) -> None:
        opt.zero_grad(set_to_none=True)
        trainer._loss().backward()
        sync(args.device)
        hook_call(auditor.pre_step, profiled)
        opt.step()
        sync(args.device)
        hook_call(auditor.post_step, profiled)

    for _ in range(3):  # builds the fused kernel, creates the optimizer's state
        audited_step(False)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            audited_step(True)
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(args.top)
    tensors = len(list(model.parameters()))
    print(f"# {args.steps} audited steps, {tensors} tensors, batch {args.batch}, {args.device}")
    print("## Python, by own time (cProfile, hooks only)")
    print(stream.getvalue())
    sorts = ["self_cpu_time_total"] + (["self_cuda_time_total"] if len(activities) > 1 else [])
    for sort in sorts:
        print(f"## torch ops, by {sort} (the whole steps; sfdiag.* rows are the hooks)")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
