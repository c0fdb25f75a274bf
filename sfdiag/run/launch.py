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
from dataclasses import dataclass, replace
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
    python_options: tuple[str, ...] = ()  # -W spec / -X opt, as "-Wspec", "-Xopt"
    environment: tuple[tuple[str, str], ...] = ()  # env VAR=value before the command

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


SUPPORTED = (
    "python [-u] [-B] [-W spec] [-X opt] script.py ARGS, python -m module ARGS, script.py ARGS "
    "(a Python script), env [VAR=value ...] python ..., torchrun [options] script.py ARGS"
)


def _python_options(words: list[str], interpreter: str) -> tuple[str, ...]:
    """Take the interpreter's own options off the front of ``words``."""
    taken: list[str] = []
    while words and words[0].startswith("-") and words[0] not in ("-", "-m"):
        word = words.pop(0)
        if word in _IGNORED_PYTHON_FLAGS:
            continue
        flag = word[:2]
        if flag in ("-W", "-X"):
            value = word[2:]
            if not value:
                if not words:
                    raise SfdiagError(f"{interpreter} {flag}: missing its argument; {USAGE}")
                value = words.pop(0)
            taken.append(flag + value)
            continue
        raise SfdiagError(
            f"python option {word} is not supported by sfdiag run (the script runs in "
            f"sfdiag's own interpreter); supported: {SUPPORTED}"
        )
    return tuple(taken)


def _not_python(path: str) -> str | None:
    """Why ``path`` is not a Python script sfdiag can run, or None when it may be one."""
    p = Path(path)
    if p.suffix in (".py", ".pyw") or p.is_dir() or not p.is_file():
        return None
    try:
        with open(p, "rb") as handle:
            first = handle.readline(200)
    except OSError:
        return None
    if first.startswith(b"#!") and b"python" not in first:
        shell = first[2:].decode(errors="replace").strip().split(" ")[0]
        return f"{path} is a script for {shell}, not a Python script"
    return None


def parse_command(argv: list[str]) -> Target:
    """What follows ``--``: see ``SUPPORTED``."""
    if not argv:
        raise SfdiagError(f"nothing to run: give the script after --; {USAGE}")
    words = list(argv)
    environment: list[tuple[str, str]] = []
    if os.path.basename(words[0]) == "env":  # env [VAR=value ...] python ...
        words.pop(0)
        while words and "=" in words[0] and not words[0].startswith("-"):
            name, _, value = words.pop(0).partition("=")
            environment.append((name, value))
        if not words:
            raise SfdiagError(f"env: no command given; {USAGE}")
    target = _parse_words(words)
    return replace(target, environment=tuple(environment)) if environment else target


def _parse_words(words: list[str]) -> Target:
    if _is_torchrun(words[0]):
        return Target(None, None, (), tuple(words[1:]))
    options: tuple[str, ...] = ()
    if _is_python(words[0]):
        interpreter = words.pop(0)
        options = _python_options(words, interpreter)
        if not words:
            raise SfdiagError(f"{interpreter}: no script given; {USAGE}")
        if words[0] == "-m":
            if len(words) < 2:
                raise SfdiagError(f"{interpreter} -m: no module given; {USAGE}")
            if words[1] in _TORCHRUN_MODULES:
                return Target(None, None, (), tuple(words[2:]))
            return Target(None, words[1], tuple(words[2:]), python_options=options)
    if words[0] == "-":
        raise SfdiagError("sfdiag run cannot run a script read from stdin; name a file")
    why = _not_python(words[0])
    if why is not None:
        raise SfdiagError(
            f"{why}: sfdiag run runs Python in its own process; run sfdiag inside it instead "
            f"(sfdiag run -- python train.py ...), supported: {SUPPORTED}"
        )
    return Target(words[0], None, tuple(words[1:]), python_options=options)


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
    saved_environment = {name: os.environ.get(name) for name, _ in target.environment}
    sys.argv = [argv0, *target.args]
    sys.path[:] = [path0, *saved_path[1:]] if saved_path else [path0]
    os.environ.update(dict(target.environment))
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


def run_target(
    target: Target, *, interrupt_once: bool = False
) -> tuple[int, bool, dict[str, Any] | None]:
    """Run the script (inside ``script_environment``); (exit code, interrupted, the
    script's globals where it ran to its end). ``interrupt_once``: once Ctrl-C stopped the
    script, later ones are ignored (a rank of a job: the launcher passes Ctrl-C on to every
    rank once more as it stops them, which must not cut short the rank's part of the
    report; it kills what still runs after its own timeout)."""
    _apply_python_options(target.python_options)
    try:
        if target.module is not None:
            namespace = runpy.run_module(target.module, run_name="__main__", alter_sys=True)
        else:
            namespace = runpy.run_path(str(target.path), run_name="__main__")
    except SystemExit as stop:
        return _exit_code(stop.code), False, None
    except KeyboardInterrupt as exc:
        if interrupt_once:
            _ignore_interrupts()
        _print_uncaught(exc)
        return EXIT_INTERRUPTED, True, None
    except BaseException as exc:  # the script's own error: its traceback, exit 1
        _print_uncaught(exc)
        return 1, False, None
    return 0, False, namespace


def _ignore_interrupts() -> None:
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to set
        pass


def _apply_python_options(options: tuple[str, ...]) -> None:
    """What ``python -W spec`` and ``-X opt`` ask, in this process (as far as it can be:
    ``-X`` options that act at interpreter start are recorded in ``sys._xoptions`` only)."""
    import warnings

    for option in options:
        flag, value = option[:2], option[2:]
        if flag == "-W":
            try:
                warnings._setoption(value)  # what python's own -W handling calls
            except Exception:  # a spec python itself would warn about: ignored like there
                pass
        elif flag == "-X":
            key, _, setting = value.partition("=")
            sys._xoptions[key] = setting or True


def _stepping_objects(namespace: dict[str, Any] | None) -> list[str]:
    """Objects the script holds (its globals, and their attributes) that have a ``step()``
    and are not torch optimizers: what ``sfdiag run`` cannot audit through step hooks."""
    if not namespace:
        return []
    import types

    try:
        from torch.optim import Optimizer
    except ImportError:  # pragma: no cover
        return []
    found: dict[int, str] = {}
    values = list(namespace.values())
    for value in list(values):
        attrs = (
            getattr(value, "__dict__", None) if not isinstance(value, types.ModuleType) else None
        )
        if isinstance(attrs, dict) and not isinstance(value, type) and len(attrs) <= 256:
            values.extend(attrs.values())
    for value in values:
        kind = type(value)
        if issubclass(kind, (type, types.ModuleType, types.FunctionType, types.MethodType)):
            continue
        if issubclass(kind, Optimizer) or not callable(getattr(kind, "step", None)):
            continue
        if kind.__module__.startswith(("torch", "builtins")):
            continue  # a scheduler, a DataLoader: not an optimizer
        found.setdefault(id(kind), f"{kind.__module__}:{kind.__qualname__}")
    return sorted(found.values())


def nothing_stepped(
    target: Target,
    namespace: dict[str, Any] | None,
    code: int = 0,
    *,
    interrupted: bool = False,
    rank: int | None = None,
) -> str:
    """Why a run has nothing to show, and what to do. A script that ended early (its
    ``code`` not 0) is told as that: it never reached an optimizer, which says nothing
    about the optimizer it would have stepped. ``rank``: this rank's, in a job."""
    on_rank = f"rank {rank}: " if rank is not None else ""
    if interrupted:
        return f"sfdiag: {on_rank}the script was interrupted before any optimizer stepped"
    if code != 0:
        return f"sfdiag: {on_rank}the script exited with code {code} before any optimizer stepped"
    missed = _stepping_objects(namespace)
    text = f"sfdiag: {target.shown} stepped no torch.optim.Optimizer; nothing to audit"
    if missed:
        names = ", ".join(missed[:3])
        text += (
            f". It holds {names}, with a step() that is not a torch optimizer's: sfdiag run "
            f"audits through torch's optimizer step hooks; audit it with sfdiag probe "
            f"(a config with `class: {missed[0]}`)"
        )
    return text


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


def root_failure(failures: dict[int, Any]) -> tuple[int, Any]:
    """The rank whose failure ended the job. A rank that exited with an error (a code > 0)
    comes before one killed by a signal: a peer's death makes gloo abort the others, often
    in the same poll of the launcher, so the earliest timestamp alone may name a bystander."""
    return min(
        failures.items(),
        key=lambda item: (item[1].exitcode <= 0, item[1].timestamp, item[0]),
    )


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
        rank, failure = root_failure(failed.failures)
        code = failure.exitcode
        if code < 0:  # killed by a signal
            code = 128 - code
        if not (rank == 0 and code == 1):  # rank 0's 1 is --strict's or the script's, told
            print(f"sfdiag: rank {rank} failed with exit code {failure.exitcode}", file=sys.stderr)
        return code or 1
    except (KeyboardInterrupt, SignalException):
        return EXIT_INTERRUPTED
    return 0
