"""Property tests of the verdict logic on real optimizer steps.

Random grads (normal, zero, -0.0, subnormal, with NaN and Inf, three dtypes, sizes on both
sides of the snapshot's sample size) get a random in-place edit inside ``step()``; the
verdict must be ``mutated`` exactly when a bit of the grad changed, ``clean`` when none
did, ``replaced`` / ``cleared`` when the tensor itself was swapped or dropped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sfdiag.step_audit import row_fits, snapshot, verdict
from sfdiag.step_audit.auditor import StepAuditor

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}
# Around snapshot.SAMPLE_SIZE (256): small tensors are sampled whole, larger ones strided.
SHAPES = ((1,), (3,), (17,), (4, 64), (257,), (300,), (7, 150), (3, 5, 101))
FILLS = ("normal", "zeros", "negzeros", "tiny", "huge", "specials", "nan", "mixed")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(_INT[t.dtype]).clone()


def make_grad(shape, dtype, fill: str, seed: int, specials: list[tuple[int, float]]):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    if fill == "zeros":
        base = torch.zeros(shape, dtype=torch.float64)
    elif fill == "negzeros":
        base = torch.full(shape, -0.0, dtype=torch.float64)
    elif fill == "tiny":
        base = base * 1e-40  # subnormal in float32, zero in bfloat16 sometimes
    elif fill == "huge":
        base = base * 1e300  # inf outside float64
    elif fill == "nan":
        base = torch.full(shape, math.nan, dtype=torch.float64)
    elif fill == "mixed":
        base = torch.where(base > 0.5, torch.full_like(base, -0.0), base)
    grad = base.to(dtype)
    flat = grad.view(-1)
    if fill in ("specials", "mixed"):
        for index, value in specials:
            flat[index % flat.numel()] = value
    return grad


special_values = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, -3.0])
grads = st.tuples(
    st.sampled_from(SHAPES),
    st.sampled_from(DTYPES),
    st.sampled_from(FILLS),
    st.integers(0, 2**31),
    st.lists(st.tuples(st.integers(0, 10_000), special_values), max_size=6),
)


# --------------------------------------------------------------------------- edits

EDITS = (
    "add_at",  # one element += a nonzero amount, by index assignment
    "add_at_data",  # the same through .data (no version-counter bump on the grad)
    "set_at",  # one element = a value (NaN, Inf, -0.0, ... included)
    "neg_at",  # flip one element's sign
    "bit_at",  # flip one bit of one element's storage: the smallest change there is
    "neg_",
    "mul_",
    "data_mul_",
    "add_noise",
    "zero_",
    "fill_nan",
    "sign_",
    "clamp_",
    "copy_",
    "add_zero",  # usually a no-op, except that -0.0 + 0.0 == +0.0
    "mul_one",  # a no-op on the bits
    "none",
)
# Nonzero amounts from 1e-4 to 1e4 in magnitude, either sign (no rejection sampling).
amounts = st.builds(
    lambda mantissa, exponent, sign: sign * mantissa * 10.0**exponent,
    st.floats(1.0, 9.99),
    st.integers(-4, 4),
    st.sampled_from([-1.0, 1.0]),
)
_EDIT_PARTS = (
    st.integers(0, 10_000),  # element index (mod numel)
    amounts,
    st.one_of(amounts, special_values),  # a value to write
    st.integers(0, 63),  # bit (mod the dtype's width)
    st.integers(0, 2**31),  # noise seed
)
edit_args = st.tuples(*_EDIT_PARTS)
edits = st.tuples(st.sampled_from(EDITS), *_EDIT_PARTS)


def apply_edit(grad: torch.Tensor, edit) -> None:
    kind, index, amount, value, bit, seed = edit
    flat = grad.view(-1)
    i = index % flat.numel()
    if kind == "add_at":
        flat[i] = flat[i] + amount
    elif kind == "add_at_data":
        grad.data.view(-1)[i] += amount
    elif kind == "set_at":
        flat[i] = value
    elif kind == "neg_at":
        flat[i] = -flat[i]
    elif kind == "bit_at":
        ints = grad.view(_INT[grad.dtype]).view(-1)
        width = grad.element_size() * 8
        ints[i] ^= torch.tensor(1, dtype=ints.dtype) << (bit % width)
    elif kind == "neg_":
        grad.neg_()
    elif kind == "mul_":
        grad.mul_(amount)
    elif kind == "data_mul_":
        grad.data.mul_(amount)
    elif kind == "add_noise":
        noise = torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed))
        grad.add_(noise.to(grad.dtype) * 1e-3)
    elif kind == "zero_":
        grad.zero_()
    elif kind == "fill_nan":
        grad.fill_(math.nan)
    elif kind == "sign_":
        grad.sign_()
    elif kind == "clamp_":
        grad.clamp_(-abs(amount), abs(amount))
    elif kind == "copy_":
        other = torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed))
        grad.copy_(other)
    elif kind == "add_zero":
        grad.add_(0.0)
    elif kind == "mul_one":
        grad.mul_(1.0)


class EditingSGD(torch.optim.SGD):
    """A real SGD step, then ``edits[k]`` applied in place to param k's grad (None: none)."""

    def __init__(self, params, edits, lr: float = 0.01):
        super().__init__(params, lr=lr)
        self.edits = edits
        self.truth: list[bool] = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        params = StepAuditor.params_of(self)
        self.truth = []
        for p, edit in zip(params, self.edits, strict=True):
            before = _bits(p.grad)
            if edit is not None:
                apply_edit(p.grad, edit)
            self.truth.append(not torch.equal(before, _bits(p.grad)))
        return loss


def _params(specs) -> list[torch.Tensor]:
    params = []
    for shape, dtype, fill, seed, specials in specs:
        grad = make_grad(shape, dtype, fill, seed, specials)
        param = torch.zeros(shape, dtype=dtype, requires_grad=True)
        param.grad = grad
        params.append(param)
    return params


@pytest.mark.filterwarnings("error::RuntimeWarning")  # huge values: no numpy overflow noise
@SETTINGS
@given(
    specs=st.lists(grads, min_size=1, max_size=3),
    chosen=st.lists(st.one_of(st.none(), edits), min_size=3, max_size=3),
    forensics=st.booleans(),
)
def test_a_changed_bit_is_mutated_and_an_untouched_grad_is_clean(specs, chosen, forensics):
    params = _params(specs)
    optimizer = EditingSGD(params, chosen[: len(params)])
    auditor = StepAuditor(forensics=forensics).attach(optimizer)
    optimizer.step()
    auditor.detach()
    (observation,) = auditor.observations
    found = [p.verdict for p in observation.params]
    assert found == ["mutated" if changed else "clean" for changed in optimizer.truth]
    assert observation.params_mutated == sum(optimizer.truth)
    for record, changed in zip(observation.params, optimizer.truth, strict=True):
        if not changed:  # NaN == NaN, Inf == Inf, -0.0 == -0.0: nothing moved
            assert record.max_rel_change == 0.0
            assert record.fingerprint is None


@pytest.mark.parametrize("kind", EDITS)
@settings(max_examples=30, deadline=None)
@given(grad=grads, args=edit_args)
def test_every_kind_of_edit_that_changes_a_grad_is_seen(kind, grad, args):
    """Through ``snapshot.take`` and ``verdict.classify`` directly, each kind of edit."""
    (param,) = _params([grad])
    before = snapshot.take([param])
    bits = _bits(param.grad)
    apply_edit(param.grad, (kind, *args))
    after = snapshot.take([param])
    changed = not torch.equal(bits, _bits(param.grad))
    event("changed" if changed else "unchanged")
    a, b = before[0], after[0]
    same_object = a.ref() is b.ref()
    assert same_object
    got = verdict.classify(b.present, same_object, a.same_content(b))
    assert got == ("mutated" if changed else "clean")


@pytest.mark.xfail(strict=True, reason="known limit of the cheap fingerprint (see docstring)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_known_limit_paired_sign_flips_outside_the_sample(dtype):
    """The fingerprint is a norm, per-block sums of the bits and a sample: edits that keep
    all three (flipping the signs of two elements, or swapping two, in the same block and
    away from the sampled ones) go unseen. No optimizer we know of does that; catching it
    would take a position-aware hash of every grad at every step."""
    grad = torch.randn(300, dtype=dtype, generator=torch.Generator().manual_seed(0))
    i, j = sorted(set(range(300)) - set(snapshot.sample_positions(300)))[-2:]
    grad[i], grad[j] = 1.5, -2.5  # outside the sample, in the last block
    (param,) = _params([((300,), dtype, "normal", 0, [])])
    param.grad = grad
    before = snapshot.take([param])[0]
    grad[i], grad[j] = -grad[i], -grad[j]
    after = snapshot.take([param])[0]
    assert not before.same_content(after)


@pytest.mark.parametrize("edit", ["swap", "sign-flips"])
def test_cancelling_edits_in_different_blocks_are_caught(edit):
    """Two edits that cancel in a whole-tensor bit-sum, outside the sample: caught because
    the checksum sums each block of the grad separately."""
    n = 64 * 1000
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1))
    i, j = 3 * 1000 + 501, 40 * 1000 + 501  # blocks 3 and 40
    assert not {i, j} & set(snapshot.sample_positions(n))
    (param,) = _params([((n,), torch.float32, "normal", 0, [])])
    param.grad = grad
    before = snapshot.take([param])[0]
    with torch.no_grad():
        if edit == "swap":
            grad[i], grad[j] = grad[j].item(), grad[i].item()
        else:
            grad.data[i], grad.data[j] = -grad[i].item(), -grad[j].item()
    after = snapshot.take([param])[0]
    assert not before.same_content(after)


@SETTINGS
@given(grad=grads, optimizer=st.sampled_from(["sgd", "sgd-momentum", "adamw", "adamw-foreach"]))
def test_optimizers_that_leave_grads_alone_are_clean(grad, optimizer):
    (param,) = _params([grad])
    bits = _bits(param.grad)
    build = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
        "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
        "adamw": lambda ps: torch.optim.AdamW(ps, foreach=False),
        "adamw-foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
    }[optimizer]
    opt = build([param])
    auditor = StepAuditor().attach(opt)
    opt.step()
    assert torch.equal(bits, _bits(param.grad))
    assert [p.verdict for p in auditor.observations[0].params] == ["clean"]


@SETTINGS
@given(grad=grads, kind=st.sampled_from(["replace", "replace-same-values", "clear"]))
def test_replaced_and_cleared(grad, kind):
    (param,) = _params([grad])

    class Swap(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            if kind == "clear":
                param.grad = None
            else:
                param.grad = param.grad.clone() if kind == "replace-same-values" else -param.grad

    opt = Swap([param], lr=0.1)
    auditor = StepAuditor().attach(opt)
    opt.step()
    (record,) = auditor.observations[0].params
    assert record.verdict == ("cleared" if kind == "clear" else "replaced")


# --------------------------------------------------------------------------- pure functions


floats64 = st.floats(allow_nan=True, allow_infinity=True, width=64)


@given(values=st.lists(floats64, min_size=1, max_size=40))
def test_max_rel_change_of_an_unchanged_array_is_zero(values):
    pre = np.array(values, dtype=np.float64)
    assert verdict.max_rel_change(pre, pre.copy()) == 0.0


@given(
    values=st.lists(floats64, min_size=1, max_size=40),
    index=st.integers(0, 39),
    new=floats64,
)
def test_max_rel_change_sees_a_changed_element(values, index, new):
    pre = np.array(values, dtype=np.float64)
    post = pre.copy()
    i = index % pre.size
    post[i] = new
    moved = not (pre[i] == new or (math.isnan(pre[i]) and math.isnan(new)))
    change = verdict.max_rel_change(pre, post)
    assert (change > 0) == moved
    assert not math.isnan(change)


@given(
    present=st.booleans(),
    same_object=st.booleans(),
    same_content=st.booleans(),
)
def test_classify_truth_table(present, same_object, same_content):
    got = verdict.classify(present, same_object, same_content)
    if not present:
        assert got == "cleared"
    elif not same_object:
        assert got == "replaced"
    else:
        assert got == ("clean" if same_content else "mutated")
    assert got in verdict.SEVERITY


# --------------------------------------------------------------------------- many grads at once

KINDS = ("adam", "adam+wd", "scaled", "weight-decay", "sign", "zeroed", "noise", "sparse", "nan")
#: rows the fits' dot products decide alone, or not: a rescale or weight decay off by a
#: relative noise on either side of the tolerances (1e-5 scaled, 1e-3 weight decay) and of
#: four times them; magnitudes whose squares under- or overflow
EDGES = ("scaled~", "weight-decay~", "tiny", "huge", "adam-ties")


def _sample_of_kind(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    g = rng.standard_normal(n) * 0.01
    y = rng.standard_normal(n)
    v = rng.random(n) * 1e-4
    u = {
        "adam": lambda: g / (np.sqrt(v) * rng.uniform(0.5, 2) + 1e-8),
        "adam+wd": lambda: g / (np.sqrt(v) + 1e-8) + 0.01 * y,
        "scaled": lambda: g * rng.uniform(0.1, 0.9),
        "weight-decay": lambda: g + 0.1 * y,
        "sign": lambda: np.sign(g),
        "zeroed": lambda: np.zeros(n),
        "noise": lambda: rng.standard_normal(n),
        "sparse": lambda: np.where(rng.random(n) < 0.8, 0.0, g) / (np.sqrt(v) + 1e-8),
        "nan": lambda: np.where(np.arange(n) == n // 2, np.nan, g / (np.sqrt(v) + 1e-8)),
        "scaled~": lambda: g * 0.5 * (1 + _off(1e-5, n, rng)),
        "weight-decay~": lambda: (
            g + 0.1 * y + 0.1 * np.linalg.norm(y / np.sqrt(n)) * _off(1e-3, n, rng)
        ),
        "tiny": lambda: g * 0.3,
        "huge": lambda: g * 0.3,
        "adam-ties": lambda: g,  # (made below)
    }[kind]()
    if kind == "adam-ties":  # every ratio the same: the median's selection among equals
        g = np.where(rng.random(n) < 0.5, -0.01, 0.01)
        v = np.full(n, rng.random() * 1e-4)
        u = g / (np.sqrt(v) * rng.uniform(0.5, 2) + 1e-8)
    if kind == "sparse":
        g = np.where(u == 0, 0.0, g)
    if kind in ("tiny", "huge"):  # float64 rows (no float32 cast) of squares out of range
        scale = 1e-158 if kind == "tiny" else 1e155
        return g * scale, u * scale, y, v, rng.standard_normal(n)
    return g, u.astype(np.float32).astype(np.float64), y, v, rng.standard_normal(n)


def _off(tol: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Noise of about ``tol`` times one of 0.1, 0.5, 2, 6 an element: a fit's relative
    residual under and over the tolerance, and over and under the dot products' margin of
    4 x it."""
    return rng.standard_normal(n) * tol * rng.choice([0.1, 0.5, 2.0, 6.0])


class _FitsIn:
    """``fingerprint_rows``' fits in C (the compiled kernel's) or, as where there is no
    compiler, in numpy, for the while."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.functions = row_fits._functions
        if self.path == "numpy":
            row_fits._functions = lambda: None
        elif self.functions() is None:
            pytest.skip("no C compiler here: the fits run in numpy")

    def __exit__(self, *exc: object) -> None:
        row_fits._functions = self.functions


@pytest.mark.parametrize("path", ["C", "numpy"])
@SETTINGS
@given(
    st.lists(st.sampled_from(KINDS + EDGES), min_size=1, max_size=12),
    st.sampled_from((1, 7, 256)),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_many_grads_fitted_at_once_are_named_as_one_at_a_time(path, kinds, n, with_param, seed):
    """``fingerprint_rows`` (the auditor's path: every mutated grad of a step at once) names
    each row as ``fingerprint`` (one grad) does, its fits in C or in numpy, and
    ``max_rel_change_rows`` measures each as ``max_rel_change``."""
    rng = np.random.default_rng(seed)
    rows = [_sample_of_kind(kind, n, rng) for kind in kinds]
    g, u, y, v, m = (np.stack(column) for column in zip(*rows, strict=True))
    y = y if with_param else None
    eps = rng.choice([1e-8, 1e-6], size=len(kinds))
    dtype_eps = np.full(len(kinds), float(np.finfo(np.float32).eps))
    one_at_a_time = [
        verdict.fingerprint(
            g[i],
            u[i],
            None if y is None else y[i],
            {"exp_avg": m[i], "exp_avg_sq": v[i]},
            float(eps[i]),
            float(dtype_eps[i]),
        )
        for i in range(len(kinds))
    ]
    states = {"exp_avg": m.copy(), "exp_avg_sq": v.copy()}
    with _FitsIn(path):
        assert verdict.fingerprint_rows(g, u, y, states, eps, dtype_eps) == one_at_a_time
        changes = verdict.max_rel_change_rows(g, u)
    assert changes == [verdict.max_rel_change(g[i], u[i]) for i in range(len(kinds))]


_SPECIALS = (np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-324, 1e-310, 1e308, -1e308, 1.0)


@SETTINGS
@given(st.integers(1, 40), st.sampled_from((1, 7, 8, 16, 257)), st.integers(0, 2**31))
def test_max_rel_change_rows_in_c_is_numpys_bit_for_bit(rows, n, seed):
    """The C code's max relative change of each row is numpy's, to the bit, whatever the
    elements: NaN, Inf, signed zeros, subnormals, magnitudes whose changes overflow."""
    rng = np.random.default_rng(seed)
    pre = rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-300, 300, (rows, 1))
    post = pre * rng.choice([1.0, 0.5, -1.0, 1 + 1e-12], (rows, n))
    for a in (pre, post):
        odd = rng.random((rows, n)) < 0.2
        a[odd] = rng.choice(_SPECIALS, odd.sum())
    with _FitsIn("C"):
        in_c = verdict.max_rel_change_rows(pre, post)
    with _FitsIn("numpy"), np.errstate(all="ignore"):
        in_numpy = verdict.max_rel_change_rows(pre, post)
    assert np.array(in_c).view(np.int64).tolist() == np.array(in_numpy).view(np.int64).tolist()


@SETTINGS
@given(st.integers(1, 300), st.sampled_from(("spread", "ties", "zeros")), st.integers(0, 2**31))
def test_the_c_median_is_numpys(count, values, seed):
    """The median the C fits take an Adam scale from is ``np.median``'s: the middle value
    or the two averaged, among many equal values too (its selection's other branch)."""
    rng = np.random.default_rng(seed)
    a = {
        "spread": lambda: rng.standard_normal(count) * 10.0 ** rng.uniform(-5, 5),
        "ties": lambda: rng.choice([-1.5, 0.25, 0.25, 3.0], count),
        "zeros": lambda: rng.choice([0.0, -0.0, 1e-300, 2.0], count),
    }[values]()
    with _FitsIn("C"):
        assert row_fits.median(a) == np.median(a)
