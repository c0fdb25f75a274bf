"""Pure verdict logic: what happened to each grad, what kind of change, what to do.

Inputs are plain numbers and small numpy arrays (the sampled elements of a
grad before and after ``step()``, of the parameter, and of the optimizer's
per-element state); no torch here.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sfdiag.results import OptimizerResult, ParamFinding, StepRecord, ratio
from sfdiag.step_audit import row_fits

# How bad each verdict is: an optimizer's verdict is its worst parameter's over all steps.
SEVERITY = {"clean": 0, "mutated": 1, "replaced": 2, "cleared": 3, "error": 4}

# Relative residual under which a candidate explains the post-step grad. float32 rounding
# sits near 1e-7; estimating an Adam denominator's scale from samples adds a little.
# Coarser dtypes (bfloat16: 8 bits of mantissa) widen both by their own rounding.
_FIT_TOL = 1e-3
_SCALE_TOL = 1e-5
_FLOAT32_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class ParamStep:
    """One parameter at one step."""

    name: str
    shape: tuple[int, ...]
    verdict: str  # clean | mutated | replaced | cleared
    pre_norm: float
    post_norm: float
    max_rel_change: float | None
    fingerprint: str | None


def classify(present_after: bool, same_object: bool, same_content: bool) -> str:
    """The verdict for one grad that existed before ``step()``."""
    if not present_after:
        return "cleared"
    if not same_object:
        return "replaced"
    return "clean" if same_content else "mutated"


def max_rel_change(pre: np.ndarray, post: np.ndarray) -> float:
    """max |post - pre| / max(|pre|, tiny) over the elements, NaN-aware (NaN == NaN)."""
    if pre.size == 0:
        return 0.0
    return float(_rel_change(pre, post).max())


def max_rel_change_rows(pre: np.ndarray, post: np.ndarray) -> list[float]:
    """``max_rel_change`` of each row of ``pre``/``post`` ([k, n])."""
    if pre.shape[1] == 0:
        return [0.0] * len(pre)
    found = row_fits.max_rel_change_rows(pre, post)
    if found is not None:
        return found
    return _rel_change(pre, post).max(axis=1).tolist()


def _rel_change(pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    """|post - pre| / max(|pre|, tiny) elementwise: 0 where an element is the same before
    and after (NaN == NaN, Inf == Inf), inf where a NaN appeared or went. Written in place,
    in two arrays: the audit runs it in an optimizer's step hook, where every kilobyte
    counts against its memory budget."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        rel = np.subtract(post, pre)
        np.abs(rel, out=rel)
        denom = np.abs(pre)
        np.maximum(denom, np.finfo(np.float64).tiny, out=denom)
        np.divide(rel, denom, out=rel)
        del denom
    # an element the same before and after is 0 already, but for Inf or NaN ones: those
    # are NaN here, with a NaN that appeared or went (inf), and are told apart alone
    odd = np.flatnonzero(np.isnan(rel))
    if len(odd):
        flat, before, after = rel.reshape(-1), pre.reshape(-1)[odd], post.reshape(-1)[odd]
        same = (before == after) | (np.isnan(before) & np.isnan(after))
        flat[odd] = np.where(same, 0.0, np.inf)
    return rel


#: the fewest elements ``_subtract_scaled`` takes a slice at a time
_SLICE = 64


def _fit(feature: np.ndarray, target: np.ndarray, scratch: np.ndarray) -> tuple[float, float]:
    """Least squares of ``target`` on one ``feature``: the coefficient, and the residual's
    norm relative to ||target|| (``scratch``, of their size, is overwritten)."""
    coef = _coef(feature, target)
    np.multiply(feature, coef, out=scratch)
    np.subtract(target, scratch, out=scratch)
    return coef, _relative(np.linalg.norm(scratch), np.linalg.norm(target))


def _relative(resid: float, scale: float) -> float:
    return resid / scale if scale > 0 else (0.0 if resid == 0 else math.inf)


def _coef(feature: np.ndarray, target: np.ndarray) -> float:
    """The least-squares coefficient of ``feature`` for ``target`` (closed form for one
    feature: what lstsq computes, without its copies and workspace)."""
    energy = float(np.dot(feature, feature))
    return float(np.dot(feature, target)) / energy if energy > 0 else 0.0


def _fit_in_place(
    feature: np.ndarray, target: np.ndarray, buffer: np.ndarray
) -> tuple[float, float]:
    """``_fit`` of a ``target`` that is scratch: the residual is left in it (computed through
    ``buffer``, of any length: see ``_subtract_scaled``)."""
    coef = _coef(feature, target)
    scale = np.linalg.norm(target)
    _subtract_scaled(target, feature, coef, buffer)
    return coef, _relative(np.linalg.norm(target), scale)


def _subtract_scaled(
    target: np.ndarray, feature: np.ndarray, coef: float, buffer: np.ndarray
) -> None:
    """``target -= coef * feature`` in place, a slice of ``buffer``'s length at a time: the
    elementwise arithmetic of ``target - coef * feature``, without an array of their size
    beside them (the one-grad fits' memory in a step hook)."""
    step = len(buffer)
    for start in range(0, len(target), step):
        part = target[start : start + step]
        scaled = np.multiply(feature[start : start + step], coef, out=buffer[: len(part)])
        np.subtract(part, scaled, out=part)


def _fits_scaled(g: np.ndarray, u: np.ndarray, tol: float, scratch: np.ndarray) -> bool:
    if not np.any(g):
        return False
    s, rel = _fit(g, u, scratch)
    return rel < tol and not math.isclose(s, 1.0, rel_tol=1e-6)


def _fits_weight_decay(
    g: np.ndarray,
    u: np.ndarray,
    y: np.ndarray | None,
    tol: float,
    scratch: np.ndarray,
    buffer: np.ndarray,
) -> bool:
    if y is None or not np.any(y):
        return False
    lam, rel = _fit_in_place(y, np.subtract(u, g, out=scratch), buffer)
    return lam != 0 and rel < tol


def _median_of(values: np.ndarray, count: int | None = None) -> float:
    """``np.median`` of ``values`` (of their ``count`` smallest, the others being larger),
    partitioning them in place (no copy of its own)."""
    n = values.size if count is None else count
    middle = n // 2
    if n % 2:
        values.partition(middle)
        return float(values[middle])
    values.partition((middle - 1, middle))
    return float((values[middle - 1] + values[middle]) / 2)


def _fits_adam(
    g: np.ndarray,
    u: np.ndarray,
    y: np.ndarray | None,
    states: Mapping[str, np.ndarray],
    eps: float,
    tol: float,
    work: np.ndarray,
    buffer: np.ndarray,
) -> bool:
    """u == g / (k * sqrt(S) + eps) + lam * y for some second-moment state S, k > 0, lam.

    Elementwise the same arithmetic as a textbook version, over whole arrays with a mask
    instead of copies of the usable elements, in one work array (``work`` is scratch; the
    residual's weight decay taken off through ``buffer``: ``_subtract_scaled``).
    Overwrites the states' arrays with their square roots.
    """
    for s in states.values():
        if s.shape != g.shape or np.any(s < 0) or not np.any(s):
            continue
        root = np.sqrt(s, out=s)  # the state's own (float64) copy: no further array
        usable = (root > 100 * eps) & (g != 0)
        if not np.any(usable):
            continue
        lam = 0.0
        for _ in range(3):  # alternate: scale k from the ratios, then lam by least squares
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                if y is not None:  # the denominator each element shows: g / (u - lam * y)
                    np.multiply(y, lam, out=work)
                    np.subtract(u, work, out=work)
                else:
                    np.copyto(work, u)
                np.divide(g, work, out=work)
                np.divide(work, root, out=work)
            ok = usable & np.isfinite(work)
            count = int(np.count_nonzero(ok))
            if not count:
                break
            np.copyto(work, np.inf, where=~ok)  # the usable ratios, the smallest: their median
            k = _median_of(work, count)
            if not k > 0:
                break
            np.multiply(root, k, out=work)  # the Adam-normalised gradient, in work
            np.add(work, eps, out=work)
            np.divide(g, work, out=work)
            np.subtract(u, work, out=work)  # what is left for lam * y
            if y is not None and np.any(y):
                lam = _coef(y, work)
            if y is not None:
                _subtract_scaled(work, y, lam, buffer)
            if np.linalg.norm(work) < tol * np.linalg.norm(u):
                return True
    return False


def fingerprint(
    pre: np.ndarray,
    post: np.ndarray,
    param: np.ndarray | None = None,
    states: Mapping[str, np.ndarray] | None = None,
    eps: float = 1e-8,
    dtype_eps: float = _FLOAT32_EPS,
    *,
    states_are_scratch: bool = False,
) -> str:
    """Name the change from ``pre`` to ``post`` (same elements of one grad), or "unknown".

    Candidates are tried from the most specific to the least: a zeroed grad, a uniform
    rescale (clipping), weight decay folded in (pre + lam * param), division by an
    Adam-style denominator built from the optimizer's state (possibly plus weight decay),
    the sign of the grad. Non-finite elements (NaN/Inf grads) are left out of the fits;
    ``dtype_eps`` is the machine epsilon of the grad's dtype, which sets the tolerances.
    ``states_are_scratch``: the states' float64 arrays are the caller's throwaway copies,
    which the fits may overwrite (the auditor's, to save a copy in a step hook).
    """
    g = np.asarray(pre, dtype=np.float64).ravel()
    u = np.asarray(post, dtype=np.float64).ravel()
    y = None if param is None else np.asarray(param, dtype=np.float64).ravel()
    convert = np.asarray if states_are_scratch else np.array  # np.array copies
    states = {k: convert(v, dtype=np.float64).ravel() for k, v in (states or {}).items()}
    finite = np.isfinite(g) & np.isfinite(u)
    if y is not None:
        finite &= np.isfinite(y)
    if not np.any(finite):
        return "unknown"
    if not np.all(finite):
        g, u = g[finite], u[finite]
        y = None if y is None else y[finite]
        states = {k: v[finite] for k, v in states.items() if v.shape == finite.shape}
    fit_tol = max(_FIT_TOL, 8 * dtype_eps)
    scale_tol = max(_SCALE_TOL, 4 * dtype_eps)
    if not np.any(u) and np.any(g):
        return "zeroed"
    scratch = np.empty_like(g)
    buffer = np.empty(max(_SLICE, g.size // 8))  # (``_subtract_scaled``'s slices)
    # Huge finite values overflow the fits' norms: that candidate fails, without a warning.
    with np.errstate(all="ignore"):
        if _fits_scaled(g, u, scale_tol, scratch):
            return "scaled"
        if _fits_weight_decay(g, u, y, fit_tol, scratch, buffer):
            return "weight-decay"
        if _fits_adam(g, u, y, states, eps, fit_tol, scratch, buffer):
            return "adam-normalized"
    if np.any(g) and np.array_equal(u, np.sign(g)):
        return "sign"
    return "unknown"


def _row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def _row_norms(a: np.ndarray) -> np.ndarray:
    return np.sqrt(_row_dots(a, a))


def _row_coef(
    feature: np.ndarray,
    target: np.ndarray,
    rows: np.ndarray,
    energy: np.ndarray | None = None,
    cross: np.ndarray | None = None,
) -> np.ndarray:
    """Each row's least-squares coefficient of ``feature`` for ``target``, as ``_fit``'s (0
    outside ``rows`` and where the feature is zero); ``energy`` and ``cross``: the rows'
    feature.feature and feature.target, where the caller has them."""
    energy = _row_dots(feature, feature) if energy is None else energy
    cross = _row_dots(feature, target) if cross is None else cross
    coef = np.zeros(len(feature))
    np.divide(cross, energy, out=coef, where=rows & (energy > 0))
    return coef


#: squared row norms in this range decide a fit from dot products (no product of two of
#: them under- or overflows); the others' residuals are computed element by element
_SAFE_SQUARES = (1e-150, 1e150)


def _row_fit(
    feature: np.ndarray,
    target: np.ndarray,
    rows: np.ndarray,
    tol: np.ndarray | float,
    energy: np.ndarray | None = None,
    scale2: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``_fit`` of each row of ``rows``: its coef, and whether the residual's norm over the
    target's is under ``tol`` (False outside ``rows``). A row far off the fit is told from
    three dot products (||t - c f||^2 = t.t - c (2 f.t - c f.f), whose rounding is orders
    of magnitude below the margin of 4 * tol it is given); only the others, those the dot
    products cannot tell from a fit, have their residual computed as ``_fit`` does.
    ``energy``, ``scale2``: f.f and t.t, where the caller has them."""
    energy = _row_dots(feature, feature) if energy is None else energy
    cross = _row_dots(feature, target)
    scale2 = _row_dots(target, target) if scale2 is None else scale2
    coef = _row_coef(feature, target, rows, energy, cross)
    low, high = _SAFE_SQUARES
    safe = (energy >= low) & (energy <= high) & (scale2 >= low) & (scale2 <= high)
    tol = np.broadcast_to(tol, coef.shape)
    far = np.zeros(len(coef), dtype=bool)
    np.greater(
        (scale2 - coef * (2 * cross - coef * energy)) / scale2,
        (4 * tol) ** 2,
        out=far,
        where=safe,
    )
    fits = np.zeros(len(coef), dtype=bool)
    picked = np.flatnonzero(rows & ~far)
    if len(picked):
        near = target[picked]
        resid = _row_norms(near - coef[picked, None] * feature[picked])
        scale = _row_norms(near)
        rel = np.full(len(picked), np.inf)
        np.divide(resid, scale, out=rel, where=scale > 0)
        rel[(scale == 0) & (resid == 0)] = 0.0
        fits[picked] = rel < tol[picked]
    return coef, fits


def _row_medians(values: np.ndarray, ok: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The median of each row's ``ok`` elements (NaN for the rows not in ``rows``): the
    others sorted past them as +inf, the middle one (or two, averaged) picked by count, as
    ``_median_of`` picks them. ``values`` is scratch: it is sorted in place."""
    out = np.full(len(values), np.nan)
    picked = np.flatnonzero(rows)
    if not len(picked):
        return out
    if len(picked) < len(values):  # (all rows, the usual case: no copy of them)
        values, ok = values[picked], ok[picked]
    np.copyto(values, np.inf, where=~ok)
    values.sort(axis=1)
    count = ok.sum(axis=1)
    low = values[np.arange(len(picked)), (count - 1) // 2]
    high = values[np.arange(len(picked)), count // 2]
    out[picked] = np.where(count % 2, high, (low + high) / 2)
    return out


def fingerprint_rows(
    pre: np.ndarray,
    post: np.ndarray,
    param: np.ndarray | None,
    states: Mapping[str, np.ndarray | None],
    eps: np.ndarray,
    dtype_eps: np.ndarray,
) -> list[str]:
    """``fingerprint`` of each row of ``pre``/``post`` ([k, n] float64: k grads' samples of
    one length), with ``param``'s rows (or None for all) and ``states``' ([k, n] each, the
    same names for every row; None: no second moment), ``eps`` and ``dtype_eps`` per row:
    the same fits over all rows at once, so a step that mutated a thousand grads pays one C
    call (``row_fits``) or, without a compiler, a few dozen numpy calls, not a thousand
    times that. A row with a non-finite element takes ``fingerprint`` itself. The states'
    arrays are overwritten."""
    g, u, y = pre, post, param

    def one_grad(i: int) -> str:  # a row with a non-finite element: left out elementwise
        return fingerprint(
            g[i],
            u[i],
            None if y is None else y[i],
            {k: v[i] for k, v in states.items() if v is not None},
            float(eps[i]),
            float(dtype_eps[i]),
            states_are_scratch=True,
        )

    fit_tol = np.maximum(_FIT_TOL, 8 * dtype_eps)
    scale_tol = np.maximum(_SCALE_TOL, 4 * dtype_eps)
    found = row_fits.kinds(g, u, y, states, eps, fit_tol, scale_tol, one_grad)
    if found is not None:
        return found
    # no C compiler here: the same fits in numpy, over all rows at once
    count = len(g)
    kinds = np.full(count, "", dtype=object)
    with np.errstate(all="ignore"):
        squares = [_row_dots(a, a) for a in (g, u) + (() if y is None else (y,))]
    # a row's sum of squares is finite only where each of its elements is: the others (a
    # NaN or Inf element, or an overflow) are looked at element by element
    finite = np.logical_and.reduce([np.isfinite(s) for s in squares])
    for i in np.flatnonzero(~finite):
        finite[i] = all(np.isfinite(a[i]).all() for a in (g, u) + (() if y is None else (y,)))
    for i in np.flatnonzero(~finite):
        kinds[i] = one_grad(i)
    open_ = finite.copy()  # rows not named yet

    def name(rows: np.ndarray, kind: str) -> None:
        kinds[rows & open_] = kind
        open_[rows] = False

    any_g = g.any(1)
    with np.errstate(all="ignore"):
        name(~u.any(1) & any_g, "zeroed")
        coef, fits = _row_fit(g, u, open_ & any_g, scale_tol, squares[0], squares[1])
        name(
            # (math.isclose(coef, 1.0, rel_tol=1e-6), as the one-grad fit asks)
            open_ & any_g & fits & (np.abs(coef - 1) > 1e-6 * np.maximum(abs(coef), 1)),
            "scaled",
        )
        any_y = y.any(1) if y is not None else None
        work, rest = np.empty_like(g), np.empty_like(g)  # (the arithmetic below in place)
        if y is not None:
            lam, fits = _row_fit(y, np.subtract(u, g, out=work), open_ & any_y, fit_tol, squares[2])
            name(open_ & any_y & (lam != 0) & fits, "weight-decay")
        u_norms = np.sqrt(squares[1])  # (``_row_norms(u)``)
        for state in states:
            if not open_.any():
                break
            s = states[state]  # (read only now: see ``changes._StateRows``)
            if s is None:  # no second moment
                continue
            usable_state = open_ & ~(s < 0).any(1) & s.any(1)
            root = np.sqrt(s, out=s)
            usable = (root > 100 * eps[:, None]) & (g != 0)
            active = usable_state & usable.any(1)
            lam = np.zeros(count)
            for _ in range(3):
                if not active.any():
                    break
                if y is not None and lam.any():  # the denominator: g / (u - lam * y) / root
                    np.multiply(y, lam[:, None], out=work)
                    np.divide(g, np.subtract(u, work, out=work), out=work)
                else:
                    np.divide(g, u, out=work)
                np.divide(work, root, out=work)
                ok = usable & np.isfinite(work)
                active &= ok.any(1)
                k = _row_medians(work, ok, active)  # (sorts work)
                active &= k > 0
                if not active.any():
                    break
                k1 = np.where(active, k, 1.0)
                np.multiply(root, k1[:, None], out=rest)  # rest: u - g / (root * k + eps)
                np.add(rest, eps[:, None], out=rest)
                np.subtract(u, np.divide(g, rest, out=rest), out=rest)
                if y is not None:
                    lam = np.where(active & any_y, _row_coef(y, rest, active & any_y), lam)
                    np.subtract(rest, np.multiply(y, lam[:, None], out=work), out=rest)
                done = active & (_row_norms(rest) < fit_tol * u_norms)
                name(done, "adam-normalized")
                active &= ~done
        if open_.any():  # (the open rows are finite: equal elements is np.array_equal)
            name(open_ & any_g & (u == np.sign(g, out=work)).all(1), "sign")
    kinds[open_] = "unknown"
    return list(kinds)


_ADVICE = {
    "adam-normalized": (
        "after step(), p.grad holds the Adam-normalised update, not the gradient: "
        "log the grad norm before step() (sfdiag.GradMonitor does), or use {ref}"
    ),
    "weight-decay": (
        "weight decay was folded into p.grad (grad + wd * param): metrics read after "
        "step() include it; log them before step()"
    ),
    "scaled": (
        "the grads were rescaled in place (clipping?): a norm read after step() is the "
        "rescaled one; log it before step()"
    ),
    "sign": "each grad was replaced by its sign in place: log grad metrics before step()",
    "zeroed": "the grads were zeroed in place: log grad metrics before step()",
    "unknown": "the grads were changed in place by step(): log grad metrics before step()",
}
_VERDICT_ADVICE = {
    "replaced": (
        "step() assigned new tensors to p.grad: references to the old grads are stale; "
        "read grads before step()"
    ),
    "cleared": "step() set p.grad to None: read grads before step()",
    "error": "the optimizer could not run on this model; see the error",
}
#: how sfdiag words its own failures (an error while auditing, not the optimizer's)
SFDIAG_FAILED = "sfdiag could not audit it"
_SFDIAG_FAILED_ADVICE = (
    "this is sfdiag's failure, not the optimizer's or the model's; please report it "
    "with this message"
)
#: who failed, for an error row: each kind has its own advice
FAILURES = ("construct", "step", "model", "sfdiag")
_FAILURE_ADVICE = {
    "construct": (
        "the optimizer could not be built on this model's parameters: fix its class or "
        "kwargs in the config, or leave it out"
    ),
    "step": (
        "the optimizer failed while stepping this model (its own code raised): see the "
        "error; the other optimizers still ran"
    ),
    "model": (
        "the model or the loss failed, not the optimizer, so every optimizer fails alike: "
        "fix the model, the loss or the data in the config"
    ),
    "sfdiag": _SFDIAG_FAILED_ADVICE,
}
#: a clean verdict over grads that held nothing but NaN (or Inf, or zero) at every step
_UNDETERMINED_ADVICE = (
    "the grads held nothing but NaN (or Inf, or zeros) at every audited step and NaN equals "
    "NaN, so the audit could not tell whether step() changed p.grad; probe it where the "
    "loss and the grads are finite"
)

# What to use instead, for our own optimizers that mutate.
_CLEAN_ALTERNATIVE = {
    "sfdiag.optim:AdamWScheduleFree": "sf-ref",
    "sfdiag.optim:SGDScheduleFree": "sf-sgd-ref",
    "schedulefree:AdamWScheduleFree": "schedulefree:AdamWScheduleFreeReference (or sf-ref)",
    "schedulefree:SGDScheduleFree": "schedulefree:SGDScheduleFreeReference (or sf-sgd-ref)",
}


def advice(
    verdict: str, fingerprint_name: str | None, cls: str = "", failure: str | None = None
) -> str | None:
    """One sentence on what to do, or None for a clean optimizer. ``failure``: for an error
    row, who failed (one of FAILURES; None: not known)."""
    if verdict == "clean":
        return None
    if verdict == "error" and failure in _FAILURE_ADVICE:
        return _FAILURE_ADVICE[failure]
    if verdict != "mutated":
        return _VERDICT_ADVICE[verdict]
    alternative = _CLEAN_ALTERNATIVE.get(cls, "an optimizer that leaves p.grad intact")
    text = _ADVICE.get(fingerprint_name or "unknown", _ADVICE["unknown"])
    return text.format(ref=alternative)


def _median(values: Sequence[float]) -> float:
    finite_or_not = [v for v in values if not math.isnan(v)]
    if not finite_or_not:
        return math.nan
    return float(statistics.median(finite_or_not))


def _most_common(names: Sequence[str | None]) -> str | None:
    named = [n for n in names if n]
    return Counter(named).most_common(1)[0][0] if named else None


def summarize_params(steps: Sequence[Sequence[ParamStep]]) -> tuple[ParamFinding, ...]:
    """Per parameter over all steps: worst verdict, median norms, max change, fingerprint."""
    by_name: dict[str, list[ParamStep]] = {}
    for step in steps:
        for p in step:
            by_name.setdefault(p.name, []).append(p)
    findings = []
    for name, records in by_name.items():
        changes = [r.max_rel_change for r in records if r.max_rel_change is not None]
        findings.append(
            ParamFinding(
                name=name,
                shape=records[0].shape,
                verdict=max((r.verdict for r in records), key=SEVERITY.__getitem__),
                pre_step_grad_norm=_median([r.pre_norm for r in records]),
                post_step_grad_norm=_median([r.post_norm for r in records]),
                max_rel_change=max(changes) if changes else None,
                fingerprint=_most_common([r.fingerprint for r in records]),
            )
        )
    return tuple(findings)


def summarize(
    label: str,
    cls: str,
    steps: Sequence[StepRecord],
    param_steps: Sequence[Sequence[ParamStep]],
    *,
    error: str | None = None,
    failure: str | None = None,
    state_bytes_per_element: float | None = None,
    nan_only: bool = False,
) -> OptimizerResult:
    """An optimizer's result from its per-step records (and an error, if it failed).

    ``failure``: who failed, for an error (one of FAILURES; an error worded as
    SFDIAG_FAILED is sfdiag's). ``nan_only``: at every audited step the grads held NaN
    and no finite non-zero element, so a clean verdict is one the audit could not tell
    from a change: the result says so (``undetermined``).
    """
    params = summarize_params(param_steps)
    worst = max((p.verdict for p in params), key=SEVERITY.__getitem__, default="clean")
    verdict = "error" if error is not None else worst
    if error is not None and error.startswith(SFDIAG_FAILED):
        failure = "sfdiag"
    undetermined = nan_only and verdict == "clean" and bool(steps)
    fp = _most_common([p.fingerprint for s in param_steps for p in s if p.verdict == "mutated"])
    pre = _median([s.pre_step_grad_norm for s in steps])
    post = _median([s.post_step_grad_norm for s in steps])
    pre_clip = [s.pre_clip_grad_norm for s in steps if s.pre_clip_grad_norm is not None]
    return OptimizerResult(
        optimizer=label,
        cls=cls,
        verdict=verdict,
        pre_step_grad_norm=pre,
        post_step_grad_norm=post,
        norm_ratio=ratio(post, pre) if steps else math.nan,
        params_mutated=sum(p.verdict != "clean" for p in params),
        params_with_grad=len(params),
        fingerprint=fp if worst == "mutated" else None,
        advice=_UNDETERMINED_ADVICE if undetermined else advice(verdict, fp, cls, failure),
        error=error,
        undetermined=undetermined,
        state_bytes_per_element=state_bytes_per_element,
        steps=tuple(steps),
        params=params,
        pre_clip_grad_norm=_median(pre_clip) if pre_clip else None,
        clipped_steps=sum(s.clipped for s in steps),
    )
