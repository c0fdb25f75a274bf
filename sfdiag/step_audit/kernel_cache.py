"""The C kernels' builds, kept in sfdiag's cache: compiled once per machine, not per process.

``fused`` compiles its C sources on first use (~0.4 s of wall time, two compilers side by
side). Every later command on the machine loads the build it kept instead (a few ms). A
build is kept in a folder of its own, named by a key over everything that shapes it: the
sources, the flags, the compiler (its command, and its executables' sizes and times: an
upgrade builds anew), Python's headers and ABI, and the CPU (the library is built for this
CPU's vectors: a home folder shared by machines of other CPUs keeps one build for each).

The folder is complete or absent: the files are copied into a folder of the process's own,
which is then renamed into place; a process that loses the race drops its copy. A kept
build that does not load is removed, and built again. A cache that cannot be written, or
that is not this user's alone to write (code is loaded from it), leaves things as without
one: the build is compiled into a temporary folder each time.
``SFDIAG_CACHE_DIR`` moves the cache (``torch_reads.cache_dir``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from sfdiag.step_audit import torch_reads

#: a folder a process was copying into, left by one that died: removed after this long
STALE_SECONDS = 600


def folder(parts: Iterable[bytes | str], compiler: list[str]) -> Path:
    """Where the build of ``parts`` (the sources and flags) by ``compiler`` is kept."""
    key = hashlib.sha256()
    for part in (*parts, *compiler, *map(_executable, compiler), sys.version, _cpu()):
        key.update(part if isinstance(part, bytes) else part.encode())
        key.update(b"\0")
    return torch_reads.cache_dir() / f"kernels-{key.hexdigest()[:16]}"


def _executable(word: str) -> str:
    """A word of the compiler's command as the executable it names (its path, size and time:
    ``ccache gcc`` names two), else as it is."""
    found = shutil.which(word) if not word.startswith("-") else None
    if found is None:
        return word
    try:
        stat = os.stat(os.path.realpath(found))
    except OSError:
        return found
    return f"{os.path.realpath(found)}:{stat.st_size}:{stat.st_mtime_ns}"


def _cpu() -> str:
    """What ``-march=native`` builds for: the first CPU's identity and features."""
    wanted = ("vendor_id", "cpu family", "model", "model name", "flags", "Features", "CPU ")
    lines = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:  # (the first CPU's block: a machine's CPUs are alike)
                if not line.strip():
                    break
                if line.startswith(wanted):
                    lines.append(line.strip())
    except OSError:
        pass
    return "\n".join(lines) or f"{platform.machine()} {platform.processor()}"


def kept(where: Path, names: Iterable[str]) -> dict[str, Path] | None:
    """The kept files of ``names`` that are there, or None where no build is kept (or one
    this user could not trust: ``torch_reads.trusted``)."""
    trusted = torch_reads.trusted
    if not (where.is_dir() and trusted(where.parent) and trusted(where)):
        return None
    return {name: where / name for name in names if (where / name).is_file()}


def drop(where: Path) -> None:
    """Remove a kept build that does not load (the next process builds it again)."""
    shutil.rmtree(where, ignore_errors=True)


def keep(built: dict[str, Path], where: Path) -> None:
    """Copy the ``built`` files (by name) into the cache as ``where``; best effort."""
    partial = where.with_name(f"{where.name}.{os.getpid()}.partial")
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        if not torch_reads.trusted(where.parent):
            return
        _remove_stale(where.parent)
        partial.mkdir(mode=0o700)
        for name, path in built.items():
            shutil.copy2(path, partial / name)
        os.rename(partial, where)  # (fails where another process kept it first)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)


def _remove_stale(cache: Path) -> None:
    now = time.time()
    for left in cache.glob("kernels-*.partial"):
        try:
            if now - left.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(left, ignore_errors=True)
        except OSError:
            pass
