"""sfdiag's performance figures, measured in one process (plus subprocesses where noted).

    python bench/run.py [--quick] [--json] [--threads N] [--device cuda]

Every A/B comparison interleaves its runs (A B, then B A, ...; or a seeded shuffle when
more than two take part) and reports medians, so that load from other processes on a
shared machine falls on both sides alike.

Figures (targets in ``harness.TARGETS``), each documented in the module doc of its family:

``audit.py``
    ``audit_overhead_ratio``, ``audit_extra_memory_fraction[_mutating]``,
    ``audit_host_us_per_tensor[_mutating]``: the auditor on a training step, its memory,
    its host time per tensor.
``optimizers.py``
    ``sf_adamw_step_vs_upstream``, ``sf_sgd_step_vs_upstream``, ``*_vs_floor``,
    ``sf_adamw_compiled_*``, ``sf_adamw_step_host_vs_upstream``: the schedule-free steps
    against the public release and the copy-bandwidth floor.
``run_figures.py``
    ``metric_audit_overhead_ratio``, ``metric_at_log_fraction``,
    ``mode_watch_overhead_ratio``, ``run_overhead_ratio_long``, ``ddp_audit_overhead_ratio``:
    ``sfdiag run``'s in-process machinery on training steps.
``run_host.py``
    ``run_step_host_us_per_tensor``, ``run_host_us_per_logged_value``: its host time.
``callbacks.py``
    ``callback_vs_audit_ratio``: the Lightning callback against ``sfdiag.audit()`` around
    the same ``trainer.fit`` (skipped without Lightning).
``cli_figures.py``
    ``cli_help_seconds``, ``compare_default_seconds``.
``scaling.py``
    ``scaling``, ``audit_overhead_ratio_100m``: the audit at 1M to 100M parameters.
``cuda_figures.py``
    ``--device cuda``: the figures on a GPU.

``harness.py`` holds what they share (``Settings``, the interleaved timing, the trainers,
the workers), ``render.py`` the text. This module collects the figures (``collect``) and
is the entry point, also of the workers: ``bench/run.py --worker KIND ...`` (in a fresh
process, with glibc malloc pinned; ``harness.run_worker``, torchrun for ``ddp``).

``torch.set_num_threads(--threads)`` (default 1) holds in this process and its workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start/stop lines on stderr
# torch's C++ reads built before the first figure (once per torch, into sfdiag's cache), not
# in the background during one: the figures are the ones a run gets once they are there
os.environ.setdefault("SFDIAG_TORCH_READS", "now")
# the figures' modules sit beside this one (run as a script, this folder is on the path)
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import torch  # noqa: E402
from audit import audit_figures  # noqa: E402
from audit import host_figures as audit_host_figures  # noqa: E402
from callbacks import callback_figures  # noqa: E402
from cli_figures import cli_figures  # noqa: E402
from cuda_figures import measure_cuda  # noqa: E402
from harness import PINNED_MALLOC, TARGETS, Settings, machine_info, meets  # noqa: E402
from optimizers import host_step_figures, step_figures, steps_worker  # noqa: E402
from render import render, render_cuda  # noqa: E402
from run_figures import ddp_worker, machinery_figures, measure_long_run  # noqa: E402
from run_host import host_figures as run_host_figures  # noqa: E402
from scaling import scaling_figures, scaling_worker  # noqa: E402


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
    out.update(audit_figures(settings))
    out.update(machinery_figures(settings, say))  # says each of its four

    say("optimizer steps")
    out.update(step_figures(settings, say))

    say("the host's cost per tensor")
    out.update(audit_host_figures(settings))
    out.update(run_host_figures(settings, notes))
    out.update(host_step_figures(settings, notes))

    say("CLI")
    out.update(cli_figures(settings))

    say("scaling")
    out.update(scaling_figures(settings, say, notes))

    say("the Lightning callback")
    out.update(
        callback_figures(settings.callback_steps, settings.callback_rounds, settings.threads, notes)
    )

    say("CUDA")
    out["cuda"] = measure_cuda(settings)

    out["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    out["targets"] = {k: f"{op} {v}" for k, (op, v) in TARGETS.items()}
    out["met"] = {k: meets(k, out.get(k)) for k in TARGETS}
    out["settings"] = asdict(settings)
    out["notes"] = notes
    return out


def worker(kind: str, rest: list[str], settings: Settings) -> dict[str, Any] | None:
    """One measurement in this (fresh) process: ``--worker KIND [ARGS]``; None where a
    rank other than 0 of the ``ddp`` job has nothing to report."""
    torch.set_num_threads(settings.threads)
    if kind == "scaling":
        return scaling_worker(int(rest[0]), bool(int(rest[1])), settings)
    if kind == "ddp":
        return ddp_worker(settings)
    if kind == "long":
        return measure_long_run(settings)
    return steps_worker(settings)


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
    # internal: one measurement in a fresh process (harness.run_worker)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        result = worker(kind, rest, Settings.from_json(args.settings))
        if result is not None:
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
