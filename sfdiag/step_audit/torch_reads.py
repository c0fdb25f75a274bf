"""``tensor_facts.cpp``, built against the torch that runs: the checks' module
(``plain_squares.c``) then reads a tensor's dtype, layout, device, contiguity, size and
address, and a parameter's grad and version, through torch's C++ API (a field each) instead
of torch's Python attributes (~50 ns a call, eight a grad). ``sfdiag run`` reads a thousand
grads so two or three times a step: 0.27 → 0.03 ms a read of 2,000 grads here.

Compiling against torch's headers takes a C++ compiler ~12 s of one core, too long for the
first use of a command: the library is built once per torch (and Python, and this source)
into sfdiag's cache, in the background, by a process of its own that outlives the one that
started it; until it is there, and wherever it cannot be built (no C++ compiler, a torch
without its headers, a cache that cannot be written), the checks read Python's attributes
as before: the same decisions, the same kernel, the same bits.

``SFDIAG_TORCH_READS``: ``auto`` (the default: as above), ``now`` (build it now and wait:
what the benchmarks do), ``off`` (never). ``SFDIAG_CACHE_DIR``: the cache (else
``$XDG_CACHE_HOME/sfdiag``, else ``~/.cache/sfdiag``). A failed build leaves
``tensor_facts-<key>.failed`` there with the compiler's last words, and is not tried again
for that torch until the file is removed. A cache that is not this user's alone to write
(``trusted``) is neither loaded from nor built into: code is loaded from it.

No torch or sfdiag import at module level: the background build runs this file as a script.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("tensor_facts.cpp")
SETTING = "SFDIAG_TORCH_READS"
CACHE = "SFDIAG_CACHE_DIR"
#: a build's lock older than this is a build that died: taken over
STALE_LOCK_SECONDS = 600
BUILD_TIMEOUT_SECONDS = 300


class _State:
    """This process's: whether the fast reads are on, and why not where they are not."""

    status = "not asked yet"
    lock = threading.Lock()


def setting() -> str:
    """``SFDIAG_TORCH_READS``: "auto", "now" or "off" (anything else reads as "auto")."""
    value = os.environ.get(SETTING, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return "now" if value in ("now", "wait") else "auto"


def status() -> str:
    """ "on", "building", "off", or why not ("unavailable: ..."): this process's fast reads."""
    return _State.status


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sfdiag"


def trusted(folder: Path) -> bool:
    """Whether ``folder`` is this user's and no one else may write in it: code is loaded
    from the cache (one under a shared temporary folder could be someone else's)."""
    try:
        stat = folder.stat()
    except OSError:
        return False
    getuid = getattr(os, "getuid", None)
    return (getuid is None or stat.st_uid == getuid()) and not stat.st_mode & 0o002


def _command() -> tuple[list[str] | None, str]:
    """The compiler's command (its output last, to be added), or None and why not."""
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None, "a free-threaded Python"
    python_include = sysconfig.get_paths().get("include")
    if not python_include or not (Path(python_include) / "Python.h").is_file():
        return None, "no Python headers"
    import torch

    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    if not (include / "torch" / "csrc" / "autograd" / "python_variable.h").is_file():
        return None, "a torch without its C++ headers"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    compiler = shlex.split(os.environ.get("CXX") or "c++")
    return [
        *compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}", f"-I{python_include}", str(SOURCE),
        f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{lib}", "-o",
    ], ""  # fmt: skip


def library_path(command: list[str]) -> Path:
    """Where the library built by ``command`` is kept: one per source, torch, Python and
    command (the torch's path is in it); a torch installed again in place (its libraries'
    sizes and times) gets one of its own."""
    import torch

    key = hashlib.sha256()
    lib = Path(torch.__file__).parent / "lib"
    installed = [
        f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in (lib / "libtorch_python.so", lib / "libtorch_cpu.so", lib / "libc10.so")
        if p.is_file()
    ]
    for part in (SOURCE.read_bytes(), torch.__version__, sys.version, *installed, *command):
        key.update(part if isinstance(part, bytes) else part.encode())
    return cache_dir() / f"tensor_facts-{key.hexdigest()[:16]}.so"


def attach(checks: Any) -> str:
    """Hand the fast reads to ``checks`` (the checks' module) where the library is built;
    else start building it (``auto``: in the background, handed over once built; ``now``:
    waited for). This process's status (``status``)."""
    with _State.lock:
        _State.status = _attach(checks)
        return _State.status


def _attach(checks: Any) -> str:
    mode = setting()
    if mode == "off":
        checks.use_fast(None, None, None, None)
        return "off"
    command, why = _command()
    if command is None:
        return f"unavailable: {why}"
    path = library_path(command)
    if path.parent.exists() and not trusted(path.parent):
        return "unavailable: the cache is not this user's alone to write"
    if _use(checks, path):
        return "on"
    failed = _failure(path)
    if failed is not None:
        return failed
    job = _start_build(command, path)
    lock = path.with_suffix(".lock")
    if job is None and not lock.exists():
        return "unavailable: the cache cannot be written"
    if mode == "now":  # (another process's build: its lock goes when it is done)
        deadline = time.monotonic() + BUILD_TIMEOUT_SECONDS + 30
        while (job.poll() is None if job is not None else lock.exists()) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        return _after_build(checks, path)
    if job is None:
        return "building"  # by another process: the next one uses it
    waiter = threading.Thread(target=_attach_when_built, args=(job, checks, path), daemon=True)
    waiter.start()
    return "building"


def _use(checks: Any, path: Path) -> bool:
    """Load the library at ``path`` and hand its functions to ``checks``; False where it is
    not there (or does not load: a torch changed in place)."""
    if not path.is_file() or not trusted(path.parent):
        return False
    try:
        lib = ctypes.CDLL(str(path))
        functions = [
            ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            for name in ("sfdiag_tensor_facts", "sfdiag_grads_of", "sfdiag_version_of")
        ]
    except (OSError, AttributeError):
        return False
    import torch

    checks.use_fast(*functions, torch.nn.Parameter)
    _State.library = lib  # type: ignore[attr-defined]  # (loaded for the process's life)
    return True


def _failure(path: Path) -> str | None:
    """The status where a build of ``path`` failed (its note is in the cache), else None."""
    failed = path.with_suffix(".failed")
    return f"unavailable: the build failed (see {failed})" if failed.exists() else None


def _after_build(checks: Any, path: Path) -> str:
    """The status once a build has ended: "on" where its library loads; else why not (a
    library that was built and does not load is noted, so that no process builds it again
    each time); "building" where it has not ended."""
    if _use(checks, path):
        return "on"
    if path.is_file():
        _note_failure(path, "the library was built but does not load")
    return _failure(path) or "building"


def _attach_when_built(job: subprocess.Popen, checks: Any, path: Path) -> None:
    job.wait()
    with _State.lock:
        if _State.status == "building":  # (not turned off meanwhile)
            _State.status = _after_build(checks, path)


def _start_build(command: list[str], path: Path) -> subprocess.Popen | None:
    """The build's process (this file, run as a script), where no other process is building
    it; None where one is, or the cache cannot be written."""
    lock = path.with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)  # its build died
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError:
        return None
    os.close(descriptor)
    try:
        return subprocess.Popen(
            # (-I: not this file's folder on the path: its modules' names are not for others)
            [sys.executable, "-I", str(Path(__file__)), str(path), *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # it finishes the cache when this process is gone
        )
    except OSError:
        lock.unlink(missing_ok=True)
        return None


def _note_failure(path: Path, why: str) -> None:
    """``<library>.failed`` with ``why`` (whole or not at all): no build of it again."""
    failed = path.with_suffix(".failed")
    text = path.with_name(f"{failed.name}.{os.getpid()}.partial")
    try:
        text.write_text(f"{why}\n")
        os.replace(text, failed)
    except OSError:
        text.unlink(missing_ok=True)


def _build(path: Path, command: list[str]) -> int:
    """The build's process: compile into a file of its own, move it in place (a process that
    loads the library sees all of it or none), leave why where it failed; then unlock."""
    try:
        os.nice(10)  # (a core the training may want)
    except OSError:
        pass
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        try:
            done = subprocess.run(
                [*command, str(partial)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_SECONDS,
            )
            failure = "" if done.returncode == 0 else (done.stderr or f"exit {done.returncode}")
        except (OSError, subprocess.SubprocessError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
        if not failure:
            os.replace(partial, path)
            return 0
        _note_failure(path, f"{shlex.join(command)}\n\n{failure[-4000:]}")
        return 1
    finally:
        partial.unlink(missing_ok=True)
        path.with_suffix(".lock").unlink(missing_ok=True)


if __name__ == "__main__":  # the background build: torch_reads.py LIBRARY COMMAND...
    sys.exit(_build(Path(sys.argv[1]), sys.argv[2:]))
