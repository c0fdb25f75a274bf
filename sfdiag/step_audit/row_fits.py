"""``verdict.fingerprint_rows``' fits and ``max_rel_change_rows`` in C (``fit_rows.c``,
compiled into the fused kernel's library): each row fitted in a few passes over its own
elements, the kinds as codes. Where the library cannot be built, these return None and
numpy does the same (``verdict``): the same kinds, fit for fit, the same elementwise
arithmetic (a row's sums are added in another order, many orders of magnitude below every
tolerance); the same changes, bit for bit.

No torch at import (``verdict`` is imported without it); the library is asked for when
rows are fitted, which an audit does with torch loaded.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

#: a row's code -> its kind (``fit_rows.c``'s; 0: no fit named it yet)
KINDS = {
    1: "zeroed",
    2: "scaled",
    3: "weight-decay",
    4: "adam-normalized",
    5: "sign",
    6: "unknown",
}
NOT_FINITE = -1  # an element is not finite: the one-grad fits name the row


def _pointer(array: np.ndarray | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if array is None else array.ctypes.data)


def _rows(array: np.ndarray) -> np.ndarray:
    """``array`` as the C code reads it: C-contiguous float64 (a copy only where it is not)."""
    return np.ascontiguousarray(array, dtype=np.float64)


def _check(shape: tuple[int, ...], *rows: np.ndarray | None, **per_row: np.ndarray) -> None:
    """The C code reads what it is given: every array of rows of ``shape`` (2-D), every
    per-row array of its length. (numpy would fail on these too.)"""
    if len(shape) != 2 or any(a is not None and a.shape != shape for a in rows):
        raise ValueError(f"rows of shape {shape} expected")
    for name, a in per_row.items():
        if a.shape != shape[:1]:
            raise ValueError(f"{name}: {shape[0]} values expected, got shape {a.shape}")


def _functions() -> tuple[Any, Any, Any, Any] | None:
    from sfdiag.step_audit import fused

    lib = fused._library()
    if lib is None:
        return None
    return (
        lib.sfdiag_fit_rows,
        lib.sfdiag_fit_adam,
        lib.sfdiag_fit_sign,
        lib.sfdiag_max_rel_change_rows,
    )


def median(values: np.ndarray) -> float | None:
    """The C code's median of ``values`` (finite, at least one), as ``np.median`` has it:
    the one the Adam fit takes its scale from. None where the C code cannot run."""
    if _functions() is None:
        return None
    from sfdiag.step_audit import fused

    function = fused._library().sfdiag_median
    function.restype = ctypes.c_double
    scratch = np.array(values, dtype=np.float64)  # (reordered)
    return function(ctypes.c_int64(len(scratch)), _pointer(scratch))


def max_rel_change_rows(pre: np.ndarray, post: np.ndarray) -> list[float] | None:
    """``verdict.max_rel_change_rows`` in C (the same bits: elementwise arithmetic and a
    max); None where the C code cannot run."""
    functions = _functions()
    if functions is None:
        return None
    pre, post = _rows(pre), _rows(post)
    _check(pre.shape, post)
    out = np.empty(len(pre))
    size = (ctypes.c_int64(pre.shape[0]), ctypes.c_int64(pre.shape[1]))
    functions[3](*size, _pointer(pre), _pointer(post), _pointer(out))
    return out.tolist()


def kinds(
    g: np.ndarray,
    u: np.ndarray,
    y: np.ndarray | None,
    states: Mapping[str, np.ndarray | None],
    eps: np.ndarray,
    fit_tol: np.ndarray,
    scale_tol: np.ndarray,
    not_finite: Callable[[int], str],
) -> list[str] | None:
    """Each row's kind, fitted as ``verdict.fingerprint_rows`` fits it (see there for the
    arguments; ``states`` are read in their order, only while a row is left, and
    overwritten); ``not_finite(i)`` names a row with a non-finite element. None where the
    C code cannot run."""
    functions = _functions()
    if functions is None:
        return None
    fit_rows, fit_adam, fit_sign, _ = functions
    g, u = _rows(g), _rows(u)
    y = None if y is None else _rows(y)
    eps, fit_tol, scale_tol = _rows(eps), _rows(fit_tol), _rows(scale_tol)
    _check(g.shape, u, y, eps=eps, fit_tol=fit_tol, scale_tol=scale_tol)
    count, n = g.shape
    codes = np.empty(count, dtype=np.int8)
    squares = np.empty((count, 3))
    scratch = np.empty(3 * n)
    usable = np.empty(n, dtype=np.uint8)
    size = (ctypes.c_int64(count), ctypes.c_int64(n))
    rows = (_pointer(g), _pointer(u), _pointer(y))
    fit_rows(
        *size, *rows, _pointer(scale_tol), _pointer(fit_tol), _pointer(codes),
        _pointer(squares), _pointer(scratch),
    )  # fmt: skip
    odd = np.flatnonzero(codes == NOT_FINITE)
    found: dict[int, str] = {int(i): not_finite(int(i)) for i in odd}
    for name in states:
        if not (codes == 0).any():
            break
        s = states[name]  # (read only now: see ``changes._StateRows``)
        if s is None:  # no second moment
            continue
        s = np.ascontiguousarray(s, dtype=np.float64)  # (the fits' scratch: a view will do)
        _check(g.shape, s)
        fit_adam(
            *size, *rows, _pointer(s), _pointer(eps), _pointer(fit_tol), _pointer(squares),
            _pointer(codes), _pointer(usable), _pointer(scratch),
        )  # fmt: skip
    fit_sign(*size, rows[0], rows[1], _pointer(codes))
    # every row has a kind's code now, or NOT_FINITE: named by the one-grad fits
    codes_now = codes.tolist()
    if not found:  # (as a rule: every element finite)
        return list(map(KINDS.__getitem__, codes_now))
    return [found[i] if code == NOT_FINITE else KINDS[code] for i, code in enumerate(codes_now)]
