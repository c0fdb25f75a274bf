"""``sfdiag run``: an unmodified training script, with every optimizer it steps audited.

The script runs in this process (``runpy``), with ``sys.argv`` and ``sys.path[0]`` set
as ``python`` would set them. torch's global optimizer step hooks feed one
``StepAuditor`` per optimizer instance that steps; when the script ends the verdict
table goes to **stderr**, so the script's own stdout stays exactly what it printed,
and the JSON report goes to ``--report`` (atomically; the path is checked before the
script starts). To keep a long run's cost bounded, each optimizer's first
``AUDIT_FIRST`` steps are audited, then every ``AUDIT_EVERY``-th, at most ``AUDIT_MAX``
in all; the report's step indices say which.

Exit code: the script's own (``SystemExit`` codes as ``python`` maps them, 1 with the
script's traceback for an uncaught exception, 130 for Ctrl-C), except that
``--strict`` turns 0 into 1 when an optimizer is flagged. Bad arguments or a missing
script are an ``SfdiagError`` (exit 2) before anything runs. A script that ends the
process itself (``os._exit``) leaves no report.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from sfdiag import __version__
from sfdiag.api import EXIT_INTERRUPTED
from sfdiag.errors import SfdiagError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sfdiag.audit import StepAuditor
    from sfdiag.results import OptimizerResult, ProbeReport

# torch is imported only once the command and the report path are known to be good, so a
# usage error (exit 2) is immediate.

# Which steps are audited, per optimizer: a training run may take a million steps, and an
# audited step costs a few host syncs and a fingerprint fit per changed parameter.
AUDIT_FIRST = 20  # every one of the first steps
AUDIT_EVERY = 100  # then every 100th
AUDIT_MAX = 200  # and no more than this many in all


def audited(step: int, done: int) -> bool:
    """Whether step ``step`` (0-based) is audited, ``done`` steps having been audited."""
    return done < AUDIT_MAX and (step < AUDIT_FIRST or step % AUDIT_EVERY == 0)


_USAGE = "usage: sfdiag run [--report FILE] [--strict] -- python script.py ARGS"
# python options that change nothing we can honour in-process but are harmless to accept
_IGNORED_PYTHON_FLAGS = frozenset({"-u", "-B"})


# ---- what to run ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A script path or a module name (``-m``), and the arguments after it."""

    path: str | None
    module: str | None
    args: tuple[str, ...]

    @property
    def shown(self) -> str:
        return f"-m {self.module}" if self.module else str(self.path)


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
        raise SfdiagError(f"nothing to run: give the script after --; {_USAGE}")
    words = list(argv)
    if _is_python(words[0]):
        interpreter = words.pop(0)
        while words and words[0] in _IGNORED_PYTHON_FLAGS:
            words.pop(0)
        if not words:
            raise SfdiagError(f"{interpreter}: no script given; {_USAGE}")
        if words[0] == "-m":
            if len(words) < 2:
                raise SfdiagError(f"{interpreter} -m: no module given; {_USAGE}")
            return Target(None, words[1], tuple(words[2:]))
        if words[0].startswith("-") and words[0] != "-":
            raise SfdiagError(
                f"python option {words[0]} is not supported by sfdiag run; "
                f"only a script or -m MODULE (and -u) can follow {interpreter}"
            )
    if words[0] == "-":
        raise SfdiagError("sfdiag run cannot run a script read from stdin; name a file")
    return Target(words[0], None, tuple(words[1:]))


def _check_script(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        if not (p / "__main__.py").is_file():
            raise SfdiagError(f"cannot run {path}: a directory without __main__.py")
        return
    if not p.is_file():
        raise SfdiagError(f"script not found: {path}")
    if not os.access(p, os.R_OK):
        raise SfdiagError(f"cannot read script {path}")


def _check_module(name: str) -> None:
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


# ---- watching every optimizer that steps ----------------------------------------------------
def _reference(obj: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(obj)
    except TypeError:  # no weakref slot: keep it alive (it is stepping anyway)
        return lambda: obj


def _modules_near(frame: FrameType | None) -> Iterator[torch.nn.Module]:
    """nn.Modules the calling code holds: its frames' locals and their attributes."""
    import torch

    # frames of torch and of sfdiag itself hold no module of the user's
    skip = tuple(os.path.dirname(f) + os.sep for f in (torch.__file__, __file__))
    while frame is not None:
        if not frame.f_code.co_filename.startswith(skip):
            for value in list(frame.f_locals.values()):
                if isinstance(value, torch.nn.Module):
                    yield value
                elif not isinstance(value, type):
                    attrs = getattr(value, "__dict__", None)
                    if isinstance(attrs, dict) and len(attrs) <= 256:
                        yield from (
                            v for v in list(attrs.values()) if isinstance(v, torch.nn.Module)
                        )
        frame = frame.f_back


def guess_param_names(params: list[torch.Tensor], frame: FrameType | None) -> dict[int, str]:
    """Best effort ``id(param) -> name`` from the modules the training code holds.

    The module that covers most of ``params`` names them; the others fill gaps with
    names not used yet. Parameters no module covers are left out (``param{i}``).
    """
    wanted = {id(p) for p in params}
    candidates: list[dict[int, str]] = []
    seen: set[int] = set()
    for module in _modules_near(frame):
        if id(module) in seen:
            continue
        seen.add(id(module))
        named = {id(p): n for n, p in module.named_parameters() if id(p) in wanted}
        if named:
            candidates.append(named)
    candidates.sort(key=len, reverse=True)  # stable: on ties the innermost frame wins
    names: dict[int, str] = {}
    used: set[str] = set()
    for named in candidates:
        for key, name in named.items():
            if key not in names and name not in used:
                names[key] = name
                used.add(name)
    return names


def _safe_names(params: list[torch.Tensor], frame: FrameType | None) -> dict[int, str]:
    try:
        return guess_param_names(params, frame)
    except Exception:  # odd objects in the user's frames: fall back to param{i}
        return {}


@dataclass
class _Watched:
    label: str
    cls: str
    ref: Callable[[], Any]
    auditor: StepAuditor
    elements: int
    state_bytes_per_element: float | None = None
    error: str | None = None  # sfdiag itself could not audit this optimizer
    started: int = 0  # outermost step() calls begun
    auditing: bool = False  # the step() in progress is audited
    indices: list[int] = field(default_factory=list)  # the step index of each observation

    def result(self) -> OptimizerResult:
        from sfdiag import snapshot, verdict
        from sfdiag.results import StepRecord

        optimizer = self.ref()
        if optimizer is not None and self.elements:
            self.state_bytes_per_element = round(snapshot.state_bytes(optimizer) / self.elements, 3)
        observations = self.auditor.observations
        steps = [
            StepRecord(i, None, o.pre_norm, o.post_norm, o.params_mutated)
            for i, o in zip(self.indices, observations, strict=True)
        ]
        error = self.error
        if error is None and not observations and self.started:
            error = "step() raised before finishing; no step completed"
        return verdict.summarize(
            self.label,
            self.cls,
            steps,
            [o.params for o in observations],
            error=error,
            state_bytes_per_element=self.state_bytes_per_element,
        )


@dataclass
class OptimizerWatch:
    """torch's global step hooks, feeding one StepAuditor per optimizer instance."""

    watched: list[_Watched] = field(default_factory=list)
    _by_id: dict[int, _Watched] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)

    def install(self) -> OptimizerWatch:
        import torch.optim.optimizer as torch_optimizer

        self._handles = [
            torch_optimizer.register_optimizer_step_pre_hook(self._pre),
            torch_optimizer.register_optimizer_step_post_hook(self._post),
        ]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def results(self) -> list[OptimizerResult]:
        return [w.result() for w in self.watched]

    def _entry(self, optimizer: Any, frame: FrameType | None) -> _Watched:
        from sfdiag.audit import StepAuditor, class_path

        entry = self._by_id.get(id(optimizer))
        if entry is not None and entry.ref() is optimizer:
            return entry
        name = type(optimizer).__name__
        self._counts[name] = self._counts.get(name, 0) + 1
        label = name if self._counts[name] == 1 else f"{name}#{self._counts[name]}"
        params = StepAuditor.params_of(optimizer)
        entry = _Watched(
            label=label,
            cls=class_path(optimizer),
            ref=_reference(optimizer),
            auditor=StepAuditor(names=_safe_names(params, frame)),
            elements=sum(p.numel() for p in params),
        )
        self.watched.append(entry)
        self._by_id[id(optimizer)] = entry
        return entry

    def _pre(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        from sfdiag.audit import active_steps

        try:
            entry = self._entry(optimizer, sys._getframe(1))
            if entry.error is not None:
                return None
            auditor = entry.auditor
            if active_steps(optimizer) == 1:
                entry.auditing = audited(entry.started, len(auditor.observations))
                entry.started += 1
            if not entry.auditing:
                return None
            auditor.pre_step(optimizer)
            return _with_closure_retake(auditor, optimizer, args, kwargs)
        except Exception as exc:  # never break the user's training because of sfdiag
            self._give_up(optimizer, exc)
            return None

    def _post(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        entry = self._by_id.get(id(optimizer))
        if entry is None or entry.error is not None or not entry.auditing:
            return
        import numpy as np

        from sfdiag import snapshot

        try:
            observations = entry.auditor.observations
            before = len(observations)
            with np.errstate(all="ignore"):  # fits on odd values must not warn in the script
                entry.auditor.post_step(optimizer)
            if len(observations) > before:  # the outermost step() finished
                entry.indices.append(entry.started - 1)
                entry.auditing = False
                if entry.state_bytes_per_element is None and entry.elements:
                    entry.state_bytes_per_element = round(
                        snapshot.state_bytes(optimizer) / entry.elements, 3
                    )
        except Exception as exc:
            self._give_up(optimizer, exc)

    def _give_up(self, optimizer: Any, exc: Exception) -> None:
        entry = self._by_id.get(id(optimizer))
        if entry is not None and entry.error is None:
            text = str(exc).strip().splitlines()
            entry.error = (
                f"sfdiag could not audit it: {type(exc).__name__}: {text[0] if text else ''}"
            )


def _with_closure_retake(
    auditor: StepAuditor, optimizer: Any, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """A closure recomputes the grads inside step(): snapshot A again after each call."""
    if len(args) > 1 and callable(args[1]):
        closure, where = args[1], "arg"
    elif callable(kwargs.get("closure")):
        closure, where = kwargs["closure"], "kwarg"
    else:
        return None

    def closure_then_retake(*a: Any, **k: Any) -> Any:
        loss = closure(*a, **k)
        auditor.retake(optimizer)
        return loss

    if where == "arg":
        return (args[0], closure_then_retake, *args[2:]), kwargs
    return args, {**kwargs, "closure": closure_then_retake}


# ---- running the script ---------------------------------------------------------------------
@contextmanager
def _script_environment(argv0: str, args: tuple[str, ...], path0: str) -> Iterator[None]:
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [argv0, *args]
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


def _run(target: Target) -> tuple[int, bool]:
    """Run the script; (exit code, interrupted)."""
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


def _flush(stream: Any) -> None:
    try:
        stream.flush()
    except (AttributeError, OSError, ValueError):
        pass


def run_script(
    argv: list[str],
    *,
    report: Path | None,
    strict: bool,
    force: bool = False,
    quiet: bool = False,
) -> int:
    """Run ``argv`` (what follows ``--``) with every optimizer it steps audited.

    Prints the verdict table on stderr (the script's stdout is left alone), writes the
    JSON report to ``report`` if given, and returns the exit code (see the module doc).
    ``quiet`` drops sfdiag's notes, not the table. Raises SfdiagError before running
    anything when the command or the report path is unusable.
    """
    from sfdiag import ui
    from sfdiag.fileio import check_writable, write_atomic
    from sfdiag.report import RenderOptions, render

    target = parse_command(argv)
    if target.path is not None:
        _check_script(target.path)
    if report is not None:
        # absolute: the script may chdir
        report = check_writable(report, force, what="report").absolute()

    if target.module is not None:
        argv0, path0 = "-m", os.getcwd()
    else:
        argv0 = str(target.path)
        script = Path(target.path).resolve()
        path0 = str(script if script.is_dir() else script.parent)

    import torch

    from sfdiag.results import ProbeReport

    watch = OptimizerWatch()
    started = time.perf_counter()
    with _script_environment(argv0, target.args, path0):
        if target.module is not None:
            _check_module(target.module)
        watch.install()
        try:
            code, interrupted = _run(target)
        finally:
            watch.remove()
    seconds = time.perf_counter() - started
    _flush(sys.stdout)

    result = ProbeReport(
        config={"command": list(argv)},
        results=tuple(watch.results()),
        sfdiag_version=__version__,
        torch_version=torch.__version__,
        interrupted=interrupted,
        timing={"seconds": round(seconds, 3)},
    )
    if result.results:
        text = render(result, "table", RenderOptions(color=ui.wants_color(sys.stderr)))
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
    else:
        print(f"sfdiag: {target.shown} stepped no optimizer; nothing to audit", file=sys.stderr)
    if interrupted:
        ui.note(
            "sfdiag: the script was interrupted; the rows cover the steps it finished", quiet=quiet
        )
    if report is not None:
        write_atomic(report, _json(result), force=force, what="report")
        ui.note(f"sfdiag: json report written to {report}", quiet=quiet)
    _flush(sys.stderr)
    if strict and code == 0 and result.any_flagged:
        return 1
    return code


def _json(result: ProbeReport) -> str:
    from sfdiag.report import render

    return render(result, "json")
