"""What ``sfdiag run`` runs, and running it as ``python`` would.

The command after ``--`` is ``python [-u] script.py ARGS``, ``python -m module ARGS``
or ``script.py ARGS``. The script runs in this process (``runpy``), with
``sys.argv`` and ``sys.path[0]`` set as ``python`` sets them; its exit code is the one
``python`` would give (``SystemExit`` codes, 1 with the script's own traceback for an
uncaught exception, 130 for Ctrl-C). Bad commands are an ``SfdiagError`` (exit 2)
before anything runs.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from sfdiag.errors import SfdiagError

EXIT_INTERRUPTED = 130

USAGE = "usage: sfdiag run [OPTIONS] -- python script.py ARGS"
# python options that change nothing we can honour in-process but are harmless to accept
_IGNORED_PYTHON_FLAGS = frozenset({"-u", "-B"})


@dataclass(frozen=True)
class Target:
    """A script path or a module name (``-m``), and the arguments after it; or, for
    ``torchrun [its options] script.py ARGS``, torchrun's words (``torchrun``)."""

    path: str | None
    module: str | None
    args: tuple[str, ...]
    torchrun: tuple[str, ...] | None = None

    @property
    def shown(self) -> str:
        if self.torchrun is not None:
            return "torchrun " + " ".join(self.torchrun)
        return f"-m {self.module}" if self.module else str(self.path)

    def command(self) -> list[str]:
        """The command that runs this target under ``python``."""
        head = ["-m", str(self.module)] if self.module is not None else [str(self.path)]
        return ["python", *head, *self.args]


_TORCHRUN_MODULES = ("torch.distributed.run", "torch.distributed.launch")


def _is_torchrun(word: str) -> bool:
    return os.path.basename(word) == "torchrun"


def _is_python(word: str) -> bool:
    if os.path.basename(word).lower().startswith("python"):
        return True
    try:
        return bool(sys.executable) and os.path.samefile(word, sys.executable)
    except OSError:
        return False


def parse_command(argv: list[str]) -> Target:
    """``python [-u] script.py ARGS``, ``python -m module ARGS`` or ``script.py ARGS``."""
    if not argv:
        raise SfdiagError(f"nothing to run: give the script after --; {USAGE}")
    words = list(argv)
    if _is_torchrun(words[0]):
        return Target(None, None, (), tuple(words[1:]))
    if _is_python(words[0]):
        interpreter = words.pop(0)
        while words and words[0] in _IGNORED_PYTHON_FLAGS:
            words.pop(0)
        if not words:
            raise SfdiagError(f"{interpreter}: no script given; {USAGE}")
        if words[0] == "-m":
            if len(words) < 2:
                raise SfdiagError(f"{interpreter} -m: no module given; {USAGE}")
            if words[1] in _TORCHRUN_MODULES:
                return Target(None, None, (), tuple(words[2:]))
            return Target(None, words[1], tuple(words[2:]))
        if words[0].startswith("-") and words[0] != "-":
            raise SfdiagError(
                f"python option {words[0]} is not supported by sfdiag run; "
                f"only a script or -m MODULE (and -u) can follow {interpreter}"
            )
    if words[0] == "-":
        raise SfdiagError("sfdiag run cannot run a script read from stdin; name a file")
    return Target(words[0], None, tuple(words[1:]))


def check_script(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        if not (p / "__main__.py").is_file():
            raise SfdiagError(f"cannot run {path}: a directory without __main__.py")
        return
    if not p.is_file():
        raise SfdiagError(f"script not found: {path}")
    if not os.access(p, os.R_OK):
        raise SfdiagError(f"cannot read script {path}")


def check_module(name: str) -> None:
    """Called with sys.path already as the module will see it."""
    try:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:
            if importlib.util.find_spec(f"{name}.__main__") is None:
                raise SfdiagError(f"cannot run -m {name}: a package without __main__")
    except (ImportError, ValueError) as exc:
        raise SfdiagError(f"cannot run -m {name}: {exc}") from None
    if spec is None:
        raise SfdiagError(f"no module named {name!r} (for -m {name})")


def argv0_and_path0(target: Target) -> tuple[str, str]:
    """``sys.argv[0]`` and ``sys.path[0]`` as ``python`` sets them for ``target``."""
    if target.module is not None:
        return "-m", os.getcwd()
    script = Path(str(target.path)).resolve()
    return str(target.path), str(script if script.is_dir() else script.parent)


@contextmanager
def script_environment(target: Target) -> Iterator[None]:
    """``sys.argv`` and ``sys.path`` as the script expects them, restored afterwards."""
    argv0, path0 = argv0_and_path0(target)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [argv0, *target.args]
    sys.path[:] = [path0, *saved_path[1:]] if saved_path else [path0]
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


_OUR_MODULES = frozenset({__name__, "runpy"})


def _script_traceback(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the script's first frame on, as python would show it."""
    while tb is not None and tb.tb_frame.f_globals.get("__name__") in _OUR_MODULES:
        tb = tb.tb_next
    return tb


def _print_uncaught(exc: BaseException) -> None:
    tb = _script_traceback(exc.__traceback__)
    exc.__traceback__ = tb  # the hook prints the exception's own traceback when it has one
    try:
        sys.excepthook(type(exc), exc, tb)
    except Exception:
        sys.__excepthook__(type(exc), exc, tb)


def _exit_code(code: object) -> int:
    """What python exits with for ``SystemExit(code)``; a message is printed like python."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_target(target: Target) -> tuple[int, bool]:
    """Run the script (inside ``script_environment``); (exit code, interrupted)."""
    try:
        if target.module is not None:
            runpy.run_module(target.module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(target.path), run_name="__main__")
    except SystemExit as stop:
        return _exit_code(stop.code), False
    except KeyboardInterrupt as exc:
        _print_uncaught(exc)
        return EXIT_INTERRUPTED, True
    except BaseException as exc:  # the script's own error: its traceback, exit 1
        _print_uncaught(exc)
        return 1, False
    return 0, False


# ---- a job of several ranks, through torch's elastic launcher ---------------------------------
def _torchrun_args(words: list[str]) -> Any:
    """torchrun's own parser over ``words`` (its options, the script, the script's args)."""
    import contextlib
    import io

    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "torchrun"
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            return parser.parse_args(words)
    except SystemExit:  # argparse printed why (or the help) and exited
        lines = [line for line in said.getvalue().splitlines() if line.strip()]
        why = lines[-1] if lines else "could not read its options"
        raise SfdiagError(f"{why} (in the torchrun command after --)") from None


def job_arguments(target: Target, nproc: int, worker_options: list[str]) -> Any:
    """torchrun's arguments that run ``python -m sfdiag run OPTIONS -- <the script>`` on
    every rank: ``nproc`` local ranks (``--standalone``), or what the torchrun command in
    ``target`` asks for."""
    if target.torchrun is None:
        words = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "x.py"]
        args = _torchrun_args(words)
        script = target.command()
    else:
        args = _torchrun_args(list(target.torchrun))
        if args.no_python:
            raise SfdiagError(
                "sfdiag run -- torchrun --no-python ... is not supported: put sfdiag inside "
                "instead (torchrun --no-python sfdiag run -- python script.py)"
            )
        if args.run_path:
            raise SfdiagError("sfdiag run -- torchrun --run-path ... is not supported")
        head = ["-m"] if args.module else []
        script = ["python", *head, args.training_script, *args.training_script_args]
        if not args.module:
            check_script(args.training_script)
    args.module = True
    args.no_python = False
    args.training_script = "sfdiag"
    args.training_script_args = ["run", *worker_options, "--", *script]
    return args


def launch_job(args: Any) -> int:
    """Run the job with torch's elastic launcher (what ``torchrun`` runs); its exit code.

    A rank that fails ends the job (the launcher stops the others); its error is what that
    rank printed, and the exit code is its own. Ctrl-C ends every rank: 130.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    # the launcher's own chatter about stopping workers adds nothing to the ranks' errors
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal
            code = 128 - code
        if not (rank == 0 and code == 1):  # rank 0's 1 is --strict's or the script's, told
            print(f"sfdiag: rank {rank} failed with exit code {failure.exitcode}", file=sys.stderr)
        return code or 1
    except (KeyboardInterrupt, SignalException):
        return EXIT_INTERRUPTED
    return 0
