"""The command line's figures: ``sfdiag --help`` and ``sfdiag compare`` as subprocesses.

cli_help_seconds, compare_default_seconds
    ``sfdiag --help`` and ``sfdiag compare`` as subprocesses, medians.

Also whether ``import sfdiag.cli`` imports torch (it must not: ``--help`` stays fast).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import ROOT, Settings, interleaved


def sfdiag_command() -> list[str]:
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


def cli_figures(settings: Settings) -> dict[str, Any]:
    """``cli_help_seconds`` and ``compare_default_seconds``, with their details."""
    cli = sfdiag_command()
    help_run = time_commands({"help": ([*cli, "--help"], {})}, settings.cli_runs)["help"]
    # Beside the default, the same compare with one intra-op thread: on a busy 2-core
    # machine torch's default (one thread per core) spends its time waiting on the other.
    compares = {"default": ([*cli, "compare"], {})}
    if settings.compare_one_thread:
        compares["one_thread"] = ([*cli, "compare"], {"OMP_NUM_THREADS": "1"})
    compare = time_commands(compares, settings.compare_runs)
    return {
        "cli_help_seconds": help_run["seconds"],
        "compare_default_seconds": compare["default"]["seconds"],
        "cli": {
            "command": " ".join(Path(c).name for c in cli),
            "help": help_run,
            "compare": compare["default"],
            "compare_one_thread": compare.get("one_thread"),
            "cli_imports_torch": cli_imports_torch(),
        },
    }
