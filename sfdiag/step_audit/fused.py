"""The CPU's fused read of large grads: norm, block checksums and sample in one pass.

``fused_read.c`` (shipped with the package; ``fit_rows.c`` in the same library, for
``row_fits``) is compiled on first use by the system's C compiler (``$CC``, else ``cc``:
about 0.4 s, the sources side by side; built for this machine's CPU) and kept in sfdiag's
cache: later processes load it in a few ms (``kernel_cache``). One call reads every large grad
of a snapshot: no per-tensor Python, no guards, no launch. Where there is no compiler, or it
fails, ``broken()`` says why and torch's ops read those grads instead (two reads before
``step()`` where this takes one).

With several torch threads the rows are split among as many threads (the C code runs
without the GIL); every result is the same whatever the split.

``plain_squares.c``, built beside it where Python's headers are, is a CPython extension
module: ``plain_squares_host``'s checks of many small grads and its call of the kernel, and
``grads_of``'s read of each param's grad and version, in one C call each instead of a
Python pass per property (``sfdiag run`` reads a thousand grads so two or three times a
step). Without the headers Python does the same, to the same results. Where ``torch_reads``
has built ``tensor_facts.cpp`` for the torch that runs, that module reads each tensor through
torch's C++ API instead of its Python attributes (handed over by ``torch_reads.attach``).
"""

from __future__ import annotations

import array
import ctypes
import importlib.machinery
import importlib.util
import os
import shlex
import subprocess
import sysconfig
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfdiag.step_audit import kernel_cache, torch_reads

SOURCE = Path(__file__).with_name("fused_read.c")
#: compiled into the same library: the fits of many mutated grads (``row_fits``)
FITS_SOURCE = Path(__file__).with_name("fit_rows.c")
SOURCES = (SOURCE, FITS_SOURCE)
#: ``plain_squares_host``'s checks and its kernel call in C: a CPython extension module,
#: built beside the library where Python's headers are (else Python runs the same checks)
CHECKS_SOURCE = Path(__file__).with_name("plain_squares.c")
CHECKS_MODULE = "_sfdiag_plain_squares"

_FUNCTIONS = {
    torch.float32: ("sfdiag_read_f32", torch.int32),
    torch.bfloat16: ("sfdiag_read_bf16", torch.int16),
    torch.float16: ("sfdiag_read_f16", torch.int16),
}
_SQUARES = {  # (this order: ``tensor_facts.cpp``'s dtype codes)
    torch.float32: "sfdiag_squares_f32",
    torch.bfloat16: "sfdiag_squares_bf16",
    torch.float16: "sfdiag_squares_f16",
}

SQUARES_DTYPES = frozenset(_SQUARES)

# a tensor's properties as functions (``map`` over a thousand grads runs them with no
# Python between: half the time of a comprehension a property)
_BASE = torch._C.TensorBase
_dtype_of, _layout_of, _is_cpu = (_BASE.dtype.__get__, _BASE.layout.__get__, _BASE.is_cpu.__get__)
_PLAIN = frozenset((torch.Tensor,))
_STRIDED = frozenset((torch.strided,))

#: the largest tensor ``squares`` reads: above it torch's norm (threaded, its per-call cost
#: nothing beside the read) is as fast
SQUARES_MAX_ELEMENTS = 1 << 16

#: no fused multiply-adds where the code has none: a row's sums then take the same roundings
#: however the rows are grouped (four side by side, or one) and split among threads; a
#: square root sets no errno (the fits' loops of them then run in vectors: the same roots)
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")

#: this CPU's widest vectors where the compiler takes the flags, else portable code
ARCHES = (("-march=native", "-mprefer-vector-width=512"), ("-march=native",), ())
LIBRARY = "fused_read.so"

#: rows a thread takes at the least: fewer cost more in starting it than they save
ROWS_PER_THREAD = 16


@dataclass
class _Kernel:
    lib: Any = None
    broken: str | None = None  # why the kernel is off for this process
    checks: Any = None  # the ``plain_squares.c`` module, where it was built
    lock: threading.Lock = field(default_factory=threading.Lock)


_KERNEL = _Kernel()


def broken() -> str | None:
    """Why the kernel cannot run in this process, or None (also before its first use)."""
    return _KERNEL.broken


def supports(tensor: torch.Tensor) -> bool:
    """Whether ``read`` takes ``tensor`` (as far as is known before compiling)."""
    return _KERNEL.broken is None and _readable(tensor)


def _readable(tensor: torch.Tensor) -> bool:
    return (
        tensor.device.type == "cpu"
        and tensor.dtype in _FUNCTIONS
        and tensor.layout == torch.strided
    )


def _compile() -> tuple[Any, Any]:
    """The kernel's library (ctypes) and the checks' module (None where it did not build):
    the build kept in sfdiag's cache for this machine, else compiled (and kept)."""
    compiler = shlex.split(os.environ.get("CC") or "cc")
    where = kernel_cache.folder(_build_parts(), compiler)
    found = _load_kept(where)
    if found is not None:
        return found
    with tempfile.TemporaryDirectory(prefix="sfdiag-fused-", ignore_cleanup_errors=True) as tmp:
        checks = _start_checks(compiler, Path(tmp))  # beside the library's sources
        try:
            lib = _compile_library(compiler, Path(tmp))
        except BaseException:
            if checks is not None:
                checks[0].kill()
                checks[0].wait()
            raise
        module = _load_checks(checks)
        if checks is None or module is not None:  # (a checks' build that failed: not kept)
            built = {LIBRARY: Path(tmp) / LIBRARY}
            if checks is not None:
                built[checks[1].name] = checks[1]
            kernel_cache.keep(built, where)
        return lib, module


def _build_parts() -> list[bytes | str]:
    """What shapes the build besides the compiler (``kernel_cache``'s key): the sources, this
    file (the flags and commands), and Python's headers (whether the checks' module can be
    built, and against what)."""
    include = sysconfig.get_paths().get("include") or ""
    headers = bool(include) and (Path(include) / "Python.h").is_file()
    return [
        *(path.read_bytes() for path in (*SOURCES, CHECKS_SOURCE, Path(__file__))),
        f"{include}:{headers}:{bool(sysconfig.get_config_var('Py_GIL_DISABLED'))}",
        importlib.machinery.EXTENSION_SUFFIXES[0],
    ]


def _load_kept(where: Path) -> tuple[Any, Any] | None:
    """The build kept at ``where``, loaded; None where none is (one that does not load is
    dropped, to be built again)."""
    module_name = f"{CHECKS_MODULE}{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    files = kernel_cache.kept(where, (LIBRARY, module_name))
    if files is None:
        return None
    try:
        lib = ctypes.CDLL(str(files[LIBRARY]))
        checks = None
        if module_name in files:
            spec = importlib.util.spec_from_file_location(CHECKS_MODULE, files[module_name])
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {files[module_name]}")
            checks = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(checks)
    except Exception:  # (however it fails: the kept build is dropped, and built again)
        kernel_cache.drop(where)
        return None
    return lib, checks


def _start_checks(compiler: list[str], tmp: Path) -> tuple[subprocess.Popen, Path] | None:
    """Start building ``plain_squares.c`` (no vector code in it: one portable build); None
    where this Python has no headers to build it with, or runs without a GIL (the module
    relies on one: loading it there would turn the GIL back on for the whole process)."""
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").is_file():
        return None
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    module = tmp / f"{CHECKS_MODULE}{suffix}"
    command = [*compiler, "-O2", "-shared", "-fPIC", f"-I{include}", "-o", str(module)]
    try:
        job = subprocess.Popen(
            [*command, str(CHECKS_SOURCE)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        return None
    return job, module


def _load_checks(started: tuple[subprocess.Popen, Path] | None) -> Any:
    """The checks' module, loaded (the file may go then), or None where it did not build."""
    if started is None:
        return None
    job, path = started
    try:
        if job.wait(timeout=120) != 0:
            return None
        spec = importlib.util.spec_from_file_location(CHECKS_MODULE, path)
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (OSError, ImportError, subprocess.SubprocessError):
        if job.poll() is None:
            job.kill()
            job.wait()
        return None
    return module


def _compile_library(compiler: list[str], tmp: Path) -> Any:
    """The kernel's library: this CPU's widest vectors where the compiler takes the flags;
    else portable code."""
    library = tmp / LIBRARY
    errors = ""
    for arch in ARCHES:
        objects = [tmp / f"{source.stem}.o" for source in SOURCES]
        errors = _run_all(
            [
                [*compiler, *FLAGS, *arch, "-c", "-o", str(obj), str(source)]
                for source, obj in zip(SOURCES, objects, strict=True)
            ]
        ) or _run_all([[*compiler, *FLAGS, *arch, "-o", str(library), *map(str, objects)]])
        if not errors:
            return ctypes.CDLL(str(library))  # loaded: the file may go
    raise RuntimeError(f"{' '.join(compiler)} failed: {errors[-500:]}")


def _run_all(commands: list[list[str]]) -> str:
    """Run ``commands`` side by side (each source compiles on a core of its own): the first
    one's errors where one failed, else ""."""
    jobs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    try:
        failed = [
            err.strip() or f"exit {job.returncode}"
            for job in jobs
            for _, err in [job.communicate(timeout=120)]
            if job.returncode != 0
        ]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    return failed[0] if failed else ""


def _library() -> Any | None:
    if _KERNEL.lib is not None or _KERNEL.broken is not None:  # (each set once, under the
        return _KERNEL.lib  # lock: a read needs none)
    with _KERNEL.lock:
        if _KERNEL.lib is None and _KERNEL.broken is None:
            try:
                lib, checks = _compile()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _KERNEL.broken = f"{type(exc).__name__}: {exc}"
            else:
                _declare_squares(lib)
                _KERNEL.checks = _configure_checks(checks, lib)
                if _KERNEL.checks is not None:  # torch's C++ reads, where built (or building)
                    torch_reads.attach(_KERNEL.checks)
                _KERNEL.lib = lib
        return _KERNEL.lib


def _declare_squares(lib: Any) -> None:
    """The squares functions' arguments, declared once: called with plain ints, each call
    then costs the host a third of one that builds a ctypes object an argument (a logging
    call's read of two grads makes one)."""
    for name in _SQUARES.values():
        function = getattr(lib, name, None)
        if function is not None:
            function.argtypes = (ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
            function.restype = None


def _configure_checks(checks: Any, lib: Any) -> Any:
    """``checks`` told torch's objects and the squares functions' addresses; None: None."""
    if checks is None:
        return None
    functions = [getattr(lib, name, None) for name in _SQUARES.values()]
    addresses = tuple(
        None if function is None else ctypes.cast(function, ctypes.c_void_p).value
        for function in functions
    )
    checks.configure(torch.Tensor, torch.strided, tuple(_SQUARES), addresses, SQUARES_MAX_ELEMENTS)
    return checks


@dataclass(frozen=True)
class FusedRead:
    """What ``read`` returns for k tensors."""

    squares: torch.Tensor  # [k] float64: each tensor's sum of squares (0 where not wanted)
    row_sums: torch.Tensor  # every row's bit-sum, the tensors' rows one after another
    bounds: list[tuple[int, int]]  # each tensor's rows in row_sums, as (start, stop)
    samples: torch.Tensor  # [k, sample_size], the tensors' dtype: each one's sampled elements
    param_samples: torch.Tensor  # the same of each one's param, where one was given (else [0])


def read(
    tensors: list[torch.Tensor],
    want: list[bool],
    block: int,
    sample_size: int,
    params: list[torch.Tensor | None] | None = None,
) -> FusedRead | None:
    """Read ``tensors`` (CPU, one dtype that ``supports`` takes, each of at least
    ``sample_size`` elements) in rows of ``block`` elements: sums of squares where ``want``
    says so, each row's bit-sum (wrapping, in the integer type of the dtype's width: what
    ``bits.sum(dim=1, dtype=bits.dtype)`` gives) and the elements at ``k * (n // sample_size)``
    for k < sample_size; the same elements of ``params[k]`` where it is a tensor (contiguous,
    of the same size and dtype, on the CPU). None where the kernel cannot run."""
    dtype, count = tensors[0].dtype, len(tensors)
    params = params or [None] * count
    for t, p in zip(tensors, params, strict=True):  # the C code trusts what it is given
        if not (t.dtype == dtype and _readable(t) and t.numel() >= sample_size):
            raise ValueError(
                f"the fused kernel reads CPU tensors of one dtype, {sample_size}+ elements"
            )
        if p is not None and not (
            p.dtype == dtype and p.numel() == t.numel() and p.is_contiguous() and _readable(p)
        ):
            raise ValueError("a param the fused kernel samples must match its grad, contiguous")
    lib = _library()
    function = getattr(lib, _FUNCTIONS[dtype][0], None) if lib is not None else None
    if function is None:  # no compiler here, or one without _Float16
        return None
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]  # rare: a copy
    numel = [t.numel() for t in tensors]
    bounds, start = [], 0
    for n in numel:
        bounds.append((start, start + -(-n // block)))
        start = bounds[-1][1]
    total_rows = start
    row_squares = torch.empty(total_rows, dtype=torch.float64)
    row_sums = torch.empty(total_rows, dtype=_FUNCTIONS[dtype][1])
    samples = torch.empty(count, sample_size, dtype=dtype)
    sampling = any(p is not None for p in params)
    param_samples = torch.empty(count, sample_size, dtype=dtype) if sampling else samples[:0]
    param_pointers = [0 if p is None else p.data_ptr() for p in params]
    arguments = (
        ctypes.c_int64(count),
        (ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors]),
        (ctypes.c_int64 * count)(*numel),
        (ctypes.c_uint8 * count)(*want),
        ctypes.c_int64(block),
        ctypes.c_int64(sample_size),
    )
    outputs = (
        (ctypes.c_void_p * count)(*param_pointers),
        *(ctypes.c_void_p(t.data_ptr()) for t in (row_squares, row_sums, samples, param_samples)),
    )

    def rows(first: int, last: int) -> None:
        function(*arguments, ctypes.c_int64(first), ctypes.c_int64(last), *outputs)

    threads = max(1, min(torch.get_num_threads(), total_rows // ROWS_PER_THREAD))
    cuts = [total_rows * k // threads for k in range(threads + 1)]
    helpers = [
        threading.Thread(target=rows, args=(cuts[k], cuts[k + 1])) for k in range(1, threads)
    ]
    for helper in helpers:
        helper.start()
    rows(cuts[0], cuts[1])
    for helper in helpers:
        helper.join()
    # each tensor's rows added in one order, whatever the threads did
    with np.errstate(all="ignore"):  # a grad's Inf or NaN is a result, not an error
        squares = np.add.reduceat(row_squares.numpy(), [a for a, _ in bounds])
    return FusedRead(torch.from_numpy(squares), row_sums, bounds, samples, param_samples)


def squares(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """Each tensor's sum of squares (float64, one call for them all), for contiguous CPU
    tensors of one dtype that ``supports`` takes (the caller checks: the C code trusts
    what it is given). None where the kernel cannot run, or a tensor is larger than
    ``SQUARES_MAX_ELEMENTS`` (torch's threaded norm reads those as fast)."""
    return _as_tensor(squares_host(tensors))


def _as_tensor(out: array.array | None) -> torch.Tensor | None:
    """A Python array of doubles as a float64 tensor sharing its memory (None: None)."""
    return None if out is None else torch.frombuffer(out, dtype=torch.float64)


def squares_host(tensors: list[torch.Tensor]) -> array.array | None:
    """``squares`` as a Python array of doubles, with no torch or numpy call (``sfdiag
    run``'s hooks read a few grads cold, where each such call costs a µs or more)."""
    lib = _library()
    function = getattr(lib, _SQUARES[tensors[0].dtype], None) if lib is not None else None
    if function is None:
        return None
    # Python arrays, not numpy's: a logging call's read of two grads runs cold, where each
    # numpy call (a max, an array's address) costs a µs
    sizes = array.array("q", list(map(_BASE.numel, tensors)))
    if max(sizes) > SQUARES_MAX_ELEMENTS:
        return None
    pointers = array.array("q", list(map(_BASE.data_ptr, tensors)))
    out = array.array("d", bytes(8 * len(tensors)))
    function(len(tensors), pointers.buffer_info()[0], sizes.buffer_info()[0], out.buffer_info()[0])
    return out


def row_squares(rows: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """``plain_squares(tensors)`` from ``rows``, their stack (``[k, n]``, contiguous: one
    row a tensor, copied as it is): where every tensor is what ``plain_squares`` reads, each
    one's sum of squares is its row's, read in the same order by the same code (the same
    bits), with no pointer or size to gather a tensor. Else, or where the kernel cannot run,
    None (as ``plain_squares``)."""
    if _KERNEL.broken is not None or not tensors or not rows.is_contiguous():
        return None
    # (the stack's dtype and device are every tensor's: one shape, dtype and device for all)
    if (
        rows.dtype not in SQUARES_DTYPES
        or not rows.is_cpu
        or rows.shape[1] > SQUARES_MAX_ELEMENTS
        or not all_strided(tensors, contiguous=True)
    ):
        return None
    lib = _library()
    function = getattr(lib, _SQUARES[rows.dtype], None) if lib is not None else None
    if function is None:
        return None
    count, size = rows.shape
    # each row's first element, by numpy's arange (not a Python int a row)
    pointers = rows.data_ptr() + np.arange(count, dtype=np.int64) * (size * rows.element_size())
    sizes = array.array("q", [size]) * count
    out = torch.empty(count, dtype=torch.float64)
    function(
        ctypes.c_int64(count),
        ctypes.c_void_p(pointers.ctypes.data),
        ctypes.c_void_p(sizes.buffer_info()[0]),
        ctypes.c_void_p(out.data_ptr()),
    )
    return out


def plain_squares(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """``squares`` where every tensor is a plain (no subclass), contiguous, strided CPU
    tensor of one dtype the kernel reads, each of at most ``SQUARES_MAX_ELEMENTS``: what the
    C code trusts, checked for every tensor (a set per property: the cheapest way). Else,
    or where the kernel cannot run, None: torch's norm reads them."""
    return _as_tensor(plain_squares_host(tensors))


def plain_squares_host(tensors: list[torch.Tensor], plain: bool = False) -> array.array | None:
    """``plain_squares`` as a Python array of doubles (``squares_host``); ``plain``: the
    caller found every one a ``torch.Tensor`` (of no subclass) already. In one C call where
    the checks' module was built (``plain_squares.c``: the same checks, the same function)."""
    if not tensors or _library() is None:
        return None
    checks = _KERNEL.checks
    if checks is not None:
        out = array.array("d", bytes(8 * len(tensors)))
        return out if checks.squares(tensors, out, not plain) else None
    if (
        (not plain and set(map(type, tensors)) != _PLAIN)
        or len(dtypes := set(map(_dtype_of, tensors))) != 1
        or not dtypes <= SQUARES_DTYPES
        or set(map(_layout_of, tensors)) != _STRIDED
        or not all(map(_is_cpu, tensors))
        or not all(map(_BASE.is_contiguous, tensors))
    ):
        return None
    return squares_host(tensors)


def grads_of(params: list[torch.Tensor]) -> tuple[list[Any], list[int], bool]:
    """Each param's grad (None where it has none), its version counter (0: none), and
    whether every grad is there and a ``torch.Tensor`` (no subclass): in one C call where
    the checks' module was built (``sfdiag run`` reads a thousand grads so two or three
    times a step), else in Python alike."""
    checks = _checks()
    if checks is not None:
        return checks.grads(params)
    grads = [p.grad for p in params]
    versions = [g._version if g is not None else 0 for g in grads]
    return grads, versions, set(map(type, grads)) == _PLAIN


def all_strided(tensors: list[Any], contiguous: bool = False) -> bool:
    """Whether every one of ``tensors`` is of type exactly ``torch.Tensor`` and strided (a
    snapshot's grads, as a rule: each its own view), and ``contiguous`` too where asked. In
    one C call where the checks' module was built, else in Python alike."""
    checks = _checks()
    if checks is not None:
        return checks.strided(tensors, contiguous)
    strided = torch.strided
    return all(
        type(t) is torch.Tensor and t.layout == strided and (not contiguous or t.is_contiguous())
        for t in tensors
    )


def intact(refs: list[Any], versions: list[int], moved: list[int]) -> list[Any] | None:
    """What each weak reference (or None) refers to now (None where gone); None instead where
    a ``moved`` index lost its grad or gained one, or holds it at another version: whether
    the grads are still as ``step()`` left them. In one C call where the checks' module was
    built, else in Python alike."""
    checks = _checks()
    if checks is not None:
        return checks.intact(refs, versions, moved)
    grads = [ref() if ref is not None else None for ref in refs]
    still = all(
        (grads[i] is None) == (refs[i] is None)
        and (grads[i] is None or grads[i]._version == versions[i])
        for i in moved
    )
    return grads if still else None


def weakrefs_of(tensors: list[Any]) -> list[Any]:
    """A weak reference to each tensor (None for None): ``grads_of``'s C or Python alike."""
    checks = _checks()
    if checks is not None:
        return checks.weakrefs(tensors)
    return [weakref.ref(t) if t is not None else None for t in tensors]


def _checks() -> Any:
    """The checks' module, built with the kernel on first use; None where it is not."""
    return _KERNEL.checks if _library() is not None else None


def squares_reads(tensor: torch.Tensor) -> bool:
    """Whether ``squares`` reads ``tensor`` (``plain_squares``'s test, for one tensor: a
    snapshot reads a grad's norm the same way every time, whatever its neighbours)."""
    return (
        _KERNEL.broken is None
        and type(tensor) is torch.Tensor
        and tensor.dtype in SQUARES_DTYPES
        and tensor.layout == torch.strided
        and tensor.is_cpu
        and tensor.is_contiguous()
        and tensor.numel() <= SQUARES_MAX_ELEMENTS
    )
