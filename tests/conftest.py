"""Shared fixtures: run the real CLI in a subprocess, with tests/ importable.

Test helpers that configs name by import path (``mutators:ScaleGrads``,
``hostile_models:nan_model``) live in tests/, so the subprocess gets it on PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# torch's C++ reads (sfdiag/step_audit/torch_reads.py) are built and tested in
# test_torch_reads.py alone; elsewhere the checks read torch's Python attributes (the same
# results), and no test's process starts a build that would outlive it
os.environ.setdefault("SFDIAG_TORCH_READS", "off")
# one torch thread a process: the two pytest-xdist workers and the CLI, torchrun and spawn
# processes they start share the machine's cores, which torch's default (a thread a core, in
# each process) oversubscribes
os.environ.setdefault("OMP_NUM_THREADS", "1")
#: the tests' sfdiag cache (the C kernels' kept build, test_torch_reads.py's library): one per
#: machine and user, as a user's own is, and never the user's own
TESTS_CACHE = Path(tempfile.gettempdir()) / f"sfdiag-tests-cache-{os.getuid()}"
os.environ.setdefault("SFDIAG_CACHE_DIR", str(TESTS_CACHE))


#: the files that take longest (each runs on one worker: ``--dist loadfile``), started first so
#: that the two workers end together rather than one waiting on another's last long file
LONGEST_FIRST = (
    "test_bench.py",
    "test_distributed.py",
    "test_cli.py",
    "test_modes.py",
    "test_compile.py",
    "test_taps.py",
    "test_plot.py",
    "test_newcomer.py",
    "test_snapshot.py",
    "test_integrations.py",
    "test_hostile.py",
    "test_run_metrics.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: files' order kept)


def pytest_configure(config: pytest.Config) -> None:
    """Start building torch's C++ reads (~12 s of a core, niced) as the session starts, in
    the background, where the tests' cache holds no build of them at all (a fresh machine,
    as CI's: one of another source or torch is left to test_torch_reads.py to build): the
    tests run meanwhile, and test_torch_reads.py waits for the build's lock to go."""
    if hasattr(config, "workerinput") or any(TESTS_CACHE.glob("tensor_facts-*.so")):
        return  # (a worker of pytest-xdist: the controller started it)
    env = {**os.environ, "SFDIAG_TORCH_READS": "auto", "SFDIAG_CACHE_DIR": str(TESTS_CACHE)}
    subprocess.Popen(
        [sys.executable, "-c", "from sfdiag.step_audit import fused; fused._library()"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


CliRunner = Callable[..., subprocess.CompletedProcess]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: tests/ importable, no colour, no debug."""
    env = {k: v for k, v in os.environ.items() if k not in ("SFDIAG_DEBUG", "FORCE_COLOR")}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(TESTS) + (os.pathsep + path if path else "")
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``python -m sfdiag ARGS`` in ``cwd``; text stdout and stderr captured."""
    return subprocess.run(
        [sys.executable, "-m", "sfdiag", *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m sfdiag ARGS`` started in the background (text pipes): run several at once."""
    return subprocess.Popen(
        [sys.executable, "-m", "sfdiag", *args],
        cwd=cwd,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def sfdiag_cli(tmp_path: Path) -> CliRunner:
    """``sfdiag_cli("probe", "c.yaml", ...)`` runs the CLI in ``tmp_path``."""

    def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("cwd", tmp_path)
        return run_cli(*args, **kwargs)

    return run


def alias_bomb(key: str) -> str:
    """A config of about 400 bytes whose ``key`` expands to 9**9 strings ("billion laughs")."""
    lines = [
        "optimizers: [adamw]",
        f"{key}:",
        "  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]",
    ]
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"  - &{name} [{', '.join([f'*{previous}'] * 9)}]")
    return "\n".join(lines) + "\n"
