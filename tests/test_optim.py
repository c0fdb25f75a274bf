"""sfdiag.optim: the schedule-free optimizers against docs/algorithms.md and against each other.

Each optimizer configuration is described once in CASES; the generic tests (modes,
closure, hooks, state dict, dtypes, grad handling) run over that table.
"""

from __future__ import annotations

import collections
import io
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import sfdiag.optim._foreach as foreach_mod
from sfdiag.optim import (
    AdamWScheduleFree,
    AdamWScheduleFreeReference,
    SGDScheduleFree,
    SGDScheduleFreeReference,
)
from sfdiag.optim._foreach import tiles_of_columns
from sfdiag.optim._schedule import advance_schedule, schedule_defaults

# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "adam"  # "adam" | "sgd": which update rule
    fused: bool = True  # memory-efficient form (writes p.grad) or reference form

    def make(self, params: Any, **overrides: Any) -> torch.optim.Optimizer:
        return self.cls(params, **{**self.kwargs, **overrides})


CASES = [
    Case("sf-adamw-foreach", AdamWScheduleFree, {"foreach": True}),
    Case("sf-adamw-loop", AdamWScheduleFree, {"foreach": False}),
    Case("sf-ref", AdamWScheduleFreeReference, fused=False),
    Case("sf-sgd-foreach", SGDScheduleFree, {"lr": 0.1, "foreach": True}, family="sgd"),
    Case("sf-sgd-loop", SGDScheduleFree, {"lr": 0.1, "foreach": False}, family="sgd"),
    Case("sf-sgd-ref", SGDScheduleFreeReference, {"lr": 0.1}, family="sgd", fused=False),
]
CASE_IDS = [case.id for case in CASES]
BY_ID = {case.id: case for case in CASES}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (and stalls on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(
        dtype
    )


def batches(steps: int, dtype: torch.dtype = torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield (
            torch.randn(32, 8, generator=gen).to(dtype),
            torch.randn(32, 3, generator=gen).to(dtype),
        )


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, **kw: Any) -> None:
    opt.train()
    for x, y in batches(steps, **kw):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b, strict=True))


def run(case: Case, steps: int, dtype=torch.float32, **overrides: Any):
    """Train a fresh model; return (optimizer, model, params in train mode, params in eval)."""
    model = make_model(dtype)
    opt = case.make(model.parameters(), **overrides)
    train(model, opt, steps, dtype=dtype)
    y = snapshot(model)
    opt.eval()
    return opt, model, y, snapshot(model)


def oracle(
    p0: torch.Tensor, grads: list[torch.Tensor], *, family: str, **h: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/algorithms.md written out naively (float64): returns (x, y) after len(grads) steps."""
    lr, wd, warmup, r, power = h["lr"], h["weight_decay"], h["warmup_steps"], h["r"], h["wlp"]
    beta = h["betas"][0] if family == "adam" else h["momentum"]
    x, y, z = p0.clone(), p0.clone(), p0.clone()
    v = torch.zeros_like(p0)
    lr_max, weight_sum = -1.0, 0.0
    for k, g in enumerate(grads):
        lr_k = lr * ((k + 1) / warmup if k < warmup else 1.0)
        lr_max = max(lr_max, lr_k)
        w = (k + 1) ** r * lr_max**power
        weight_sum += w
        c = w / weight_sum if weight_sum else 0.0
        if family == "adam":
            beta2 = h["betas"][1]
            v = beta2 * v + (1 - beta2) * g * g
            direction = g / ((v / (1 - beta2 ** (k + 1))).sqrt() + h["eps"])
        else:
            direction = g
        decay_point = z if h.get("decay_at_z") else y
        z = z - lr_k * (direction + wd * decay_point)
        x = (1 - c) * x + c * z
        y = beta * x + (1 - beta) * z
    return x, y


# ----------------------------------------------------------------------------- the schedule


def test_schedule_constant_lr_averages_uniformly():
    group = schedule_defaults(0.5, 0.0, 0, 0.0, 2.0)
    cs = [advance_schedule(group).ckp1 for _ in range(5)]
    assert cs == pytest.approx([1 / (k + 1) for k in range(5)])
    assert group["k"] == 5 and group["scheduled_lr"] == 0.5 and group["lr_max"] == 0.5


def test_schedule_warmup_weights_by_lr_max_power():
    group = schedule_defaults(1.0, 0.0, 4, 0.0, 2.0)
    steps = [advance_schedule(group) for _ in range(6)]
    assert [s.lr for s in steps] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    weights = [0.25**2, 0.5**2, 0.75**2, 1.0, 1.0, 1.0]
    expected = [w / sum(weights[: i + 1]) for i, w in enumerate(weights)]
    assert [s.ckp1 for s in steps] == pytest.approx(expected)
    assert group["weight_sum"] == pytest.approx(sum(weights))


def test_schedule_zero_lr_gives_zero_weight_not_division_error():
    group = schedule_defaults(0.0, 0.0, 0, 0.0, 2.0)
    assert advance_schedule(group).ckp1 == 0.0


# ----------------------------------------------------------------------------- the equations

HYPER = dict(eps=1e-8, betas=(0.9, 0.999), momentum=0.9)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "warmup,wd,r,wlp", [(0, 0.0, 0.0, 2.0), (3, 0.1, 0.5, 2.0), (3, 0.1, 0, 0)]
)
def test_matches_algorithms_md_in_float64(case, warmup, wd, r, wlp):
    torch.manual_seed(3)
    p0 = torch.randn(5, 4, dtype=torch.float64)
    grads = [torch.randn(5, 4, dtype=torch.float64) for _ in range(8)]
    lr = case.kwargs.get("lr", 0.0025 if case.family == "adam" else 1.0)
    p = torch.nn.Parameter(p0.clone())
    opt = case.make([p], warmup_steps=warmup, weight_decay=wd, r=r, weight_lr_power=wlp)
    opt.train()
    for g in grads:
        p.grad = g.clone()
        opt.step()
    h = dict(lr=lr, weight_decay=wd, warmup_steps=warmup, r=r, wlp=wlp, **HYPER)
    x, y = oracle(p0, grads, family=case.family, **h)
    torch.testing.assert_close(p.detach(), y, rtol=1e-10, atol=1e-12)
    opt.eval()
    torch.testing.assert_close(p.detach(), x, rtol=1e-10, atol=1e-12)


def test_reference_decay_at_z_matches_algorithms_md():
    torch.manual_seed(4)
    p0 = torch.randn(6, dtype=torch.float64)
    grads = [torch.randn(6, dtype=torch.float64) for _ in range(5)]
    p = torch.nn.Parameter(p0.clone())
    opt = AdamWScheduleFreeReference([p], lr=0.01, weight_decay=0.5, decay_at_z=True)
    opt.train()
    for g in grads:
        p.grad = g.clone()
        opt.step()
    kw = dict(lr=0.01, weight_decay=0.5, warmup_steps=0, r=0.0, wlp=2.0, **HYPER)
    _, y_at_z = oracle(p0, grads, family="adam", decay_at_z=True, **kw)
    _, y_at_y = oracle(p0, grads, family="adam", **kw)
    torch.testing.assert_close(p.detach(), y_at_z, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(p.detach(), y_at_y, rtol=1e-10, atol=1e-12)


MATRIX = list(itertools.product([0, 10], [0.0, 0.01], [0.0, 0.5], [2.0, 0.0]))


@pytest.mark.parametrize("family", ["adam", "sgd"])
@pytest.mark.parametrize("warmup,wd,r,wlp", MATRIX)
def test_fused_matches_reference_over_100_steps_float32(family, warmup, wd, r, wlp):
    kw = dict(warmup_steps=warmup, weight_decay=wd, r=r, weight_lr_power=wlp)
    ids = ["sf-adamw-foreach", "sf-adamw-loop", "sf-ref"]
    if family == "sgd":
        ids = ["sf-sgd-foreach", "sf-sgd-loop", "sf-sgd-ref"]
    *fused, ref = (run(BY_ID[i], 100, **kw) for i in ids)
    for _, _, y, x in fused:
        assert rel_err(y, ref[2]) < 1e-5  # train mode: y
        assert rel_err(x, ref[3]) < 1e-5  # after eval(): x


# ----------------------------------------------------------------------------- foreach vs loop


def _two_dtype_params(seed: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    shapes = [(33, 17), (17,), (5, 3, 4), (), (300,)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ps += [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(7, 9), (9,)]]
    return ps


@pytest.mark.parametrize("family", ["adam", "sgd"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("tile_bytes", [None, 64, 1000])  # None: the default tile size
def test_foreach_and_loop_write_the_same_params_and_grads(family, wd, tile_bytes, monkeypatch):
    if tile_bytes is not None:  # force tiling: tensors split into slices and packed together
        monkeypatch.setattr(foreach_mod, "CPU_TILE_BYTES", tile_bytes)
        monkeypatch.setattr(foreach_mod, "CPU_WHOLE_TILES", 1)
    cls = AdamWScheduleFree if family == "adam" else SGDScheduleFree
    lr = 0.01 if family == "adam" else 0.1
    pa, pb = _two_dtype_params(0), _two_dtype_params(0)
    oa = cls(pa, lr=lr, weight_decay=wd, warmup_steps=2, foreach=True)
    ob = cls(pb, lr=lr, weight_decay=wd, warmup_steps=2, foreach=False)
    oa.train()
    ob.train()
    gen = torch.Generator().manual_seed(5)
    for step in range(6):
        for a, b in zip(pa, pb, strict=True):
            g = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            if step % 2 and a.dim() == 2:  # a non-contiguous gradient (cannot be sliced flat)
                g = g.t().contiguous().t()
            a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        for a, b in zip(pa, pb, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    oa.eval()
    ob.eval()
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_tiles_visit_every_element_exactly_once(monkeypatch):
    monkeypatch.setattr(foreach_mod, "CPU_TILE_BYTES", 40)  # 10 float32 elements per tile
    monkeypatch.setattr(foreach_mod, "CPU_WHOLE_TILES", 1)  # and no group whole past one
    base = [torch.zeros(23), torch.zeros(4, 6).t(), torch.zeros(3), torch.zeros(()), torch.zeros(9)]
    rows = [(t, torch.zeros_like(t)) for t in base]
    rows.append((torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)))
    sizes = []
    for first, second in tiles_of_columns([list(column) for column in zip(*rows, strict=True)]):
        assert len({t.dtype for t in first}) == 1
        torch._foreach_add_(first, 1.0)
        torch._foreach_add_(second, 2.0)
        sizes.append(sum(t.numel() for t in first))
    for a, b in rows:
        assert torch.equal(a, torch.ones_like(a)) and torch.equal(b, torch.full_like(b, 2.0))
    assert max(sizes) <= 24  # the non-contiguous 4x6 row goes in whole; the rest in <= 10


def test_small_tensors_fill_tiles_in_order_and_go_whole_where_they_fit(monkeypatch):
    """Many small tensors: the tiles filled to the brim in their order, a tensor across a
    tile's edge sliced there, every other one taken as it is (the tensor itself, not a
    view); a group of up to ``CPU_WHOLE_TILES`` tiles goes in as it is."""
    monkeypatch.setattr(foreach_mod, "CPU_TILE_BYTES", 40)  # 10 float32 elements per tile
    monkeypatch.setattr(foreach_mod, "CPU_WHOLE_TILES", 1)
    params = [torch.zeros(3) for _ in range(50)]
    grads = [torch.zeros(3) for _ in range(50)]
    tiled = list(foreach_mod.tiles_of_group([params, grads]))
    assert [sum(t.numel() for t in first) for first, _ in tiled] == [10] * 15
    crossing = {k for k in range(50) if (3 * k) // 10 != (3 * k + 2) // 10}
    for column, originals in ((0, params), (1, grads)):
        taken = [id(t) for tile in tiled for t in tile[column]]
        assert [id(t) for k, t in enumerate(originals) if k not in crossing] == [
            i for i in taken if i in {id(t) for t in originals}
        ]
    for first, _ in tiled:  # the slices write through: every element once
        torch._foreach_add_(first, 1.0)
    assert all(torch.equal(p, torch.ones(3)) for p in params)
    monkeypatch.setattr(foreach_mod, "CPU_WHOLE_TILES", 15)  # 150 elements: 15 tiles
    (whole,) = foreach_mod.tiles_of_group([params, grads])
    assert whole[0] is params and whole[1] is grads


class _TorchCalls(TorchFunctionMode):
    """Counts the torch calls made under it, attribute reads (``p.grad``, ``.device``) aside."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name != "__get__":
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _stepped_once(case: Case, count: int) -> torch.optim.Optimizer:
    """``case``'s optimizer over ``count`` tensors of 8 with grads, stepped once (the state
    is created on the first step), in train mode."""
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(count)]
    opt = case.make(params, weight_decay=0.1)
    opt.train()
    for p in params:
        p.grad = torch.randn(8)
    opt.step()
    return opt


@pytest.mark.parametrize("case", [BY_ID["sf-adamw-foreach"], BY_ID["sf-sgd-foreach"]], ids=str)
def test_a_foreach_step_off_the_cpu_makes_no_torch_call_per_tensor(case, monkeypatch):
    """On a GPU a foreach step of a few large tensors waits for its Python, not for the
    device: the step makes the same torch calls (the foreach ops) for 40 tensors as for 10,
    with no view, detach or check per tensor."""
    monkeypatch.setattr(foreach_mod, "_tile_elems", lambda first: None)  # as off the CPU
    calls = {}
    for count in (10, 40):
        opt = _stepped_once(case, count)
        with _TorchCalls() as counter:
            opt.step()
        calls[count] = counter.calls
    assert calls[10] == calls[40]
    assert sum(n for name, n in calls[10].items() if name.startswith("_foreach_")) >= 4


@pytest.mark.parametrize("case", [BY_ID["sf-adamw-foreach"], BY_ID["sf-sgd-foreach"]], ids=str)
def test_a_foreach_step_builds_no_python_object_per_tensor(case, monkeypatch):
    """What a step builds per tensor before its foreach ops (a tuple a parameter, say) is
    garbage the collector walks: on a model of a thousand tensors, a full collection every
    few dozen steps. The objects it tracks that are alive as the first foreach op starts
    are as many for 40 tensors as for 10."""
    import gc

    alive_at_first_op = {}
    for count in (10, 40):
        opt = _stepped_once(case, count)
        seen: list[int] = []
        with monkeypatch.context() as patch:
            for name in ("_foreach_mul_", "_foreach_add_", "_foreach_lerp_"):

                def counted(*args, _op=getattr(torch, name), _seen=seen, **kwargs):
                    _seen.append(gc.get_count()[0])
                    return _op(*args, **kwargs)

                patch.setattr(torch, name, counted)
            gc.collect()  # (the count starts at 0, and nothing collects during the step)
            gc.disable()
            try:
                opt.step()
            finally:
                gc.enable()
        alive_at_first_op[count] = seen[0]
    assert alive_at_first_op[10] == alive_at_first_op[40], alive_at_first_op


@pytest.mark.parametrize("case", [BY_ID["sf-adamw-foreach"], BY_ID["sf-sgd-foreach"]], ids=str)
def test_a_group_of_two_dtypes_steps_as_each_dtype_alone(case):
    """The foreach path over a param group of float32 and float64 tensors (one set of
    columns per dtype) writes the bits the loop writes."""
    torch.manual_seed(0)
    values = [torch.randn(5, dtype=dtype) for dtype in (torch.float32, torch.float64) * 3]
    grads = [torch.randn_like(v) for v in values]
    written = {}
    for foreach in (True, False):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = case.make(params, weight_decay=0.1, foreach=foreach)
        opt.train()
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        written[foreach] = [(p.detach().clone(), p.grad.clone()) for p in params]
    for (p1, g1), (p2, g2) in zip(written[True], written[False], strict=True):
        assert p1.dtype == p2.dtype
        assert torch.equal(_bits(p1), _bits(p2)) and torch.equal(_bits(g1), _bits(g2))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


class _AtenOverloads(TorchDispatchMode):
    """The aten overloads called under it, by name (``aten._foreach_add_.Tensor``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_sf_adamw_scalars_as_0_dim_tensors_change_no_bit(dtype, monkeypatch):
    """The foreach step hands beta2, bias_correction2 and eps to its ops as 0-dim tensors
    in float32/float64 on the CPU (the Scalar overloads convert the number once per
    tensor): params, grads and state come out as with plain numbers, bit for bit."""
    import sfdiag.optim.adamw as adamw_mod

    shapes = [(), (1,), (3,), (7, 5), (16, 16), (1000,)]

    def three_steps() -> tuple[list[torch.Tensor], list[str]]:
        gen = torch.Generator().manual_seed(11)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
        opt = AdamWScheduleFree(params, lr=0.01, weight_decay=0.05, warmup_steps=2)
        opt.train()
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            with _AtenOverloads() as overloads:
                opt.step()
        state = [t for p in params for t in opt.state[p].values()]
        return [*params, *(p.grad for p in params), *state], overloads.names

    as_tensors, overloads = three_steps()
    monkeypatch.setattr(adamw_mod, "scalar_operand", lambda value, like: value)
    as_numbers, _ = three_steps()
    for a, b in zip(as_tensors, as_numbers, strict=True):
        assert torch.equal(_bits(a), _bits(b))
    scalar_overloads = {f"aten._foreach_{op}.Scalar" for op in ("mul_", "div", "add_")}
    if dtype == torch.bfloat16:  # computed in float32 from the number: it stays a number
        assert scalar_overloads <= set(overloads)
    else:
        assert not scalar_overloads & set(overloads)


# ----------------------------------------------------------------------------- p.grad after step()


def _grads_before_step(params):
    return {p: p.grad.detach().clone() for p in params}


@pytest.mark.parametrize(
    "case", [BY_ID["sf-adamw-foreach"], BY_ID["sf-adamw-loop"]], ids=lambda c: c.id
)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sf_adamw_grad_equals_g_over_denom_plus_decay(case, wd):
    torch.manual_seed(7)
    p = torch.nn.Parameter(torch.randn(64, 32))
    opt = case.make([p], weight_decay=wd)
    opt.train()
    beta2, eps = 0.999, 1e-8
    for k in range(3):
        g = torch.randn(64, 32)
        v_before = opt.state[p]["exp_avg_sq"].clone() if opt.state[p] else torch.zeros_like(g)
        y_before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        v = beta2 * v_before + (1 - beta2) * g * g
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v)
        u = g / ((v / (1 - beta2 ** (k + 1))).sqrt() + eps) + wd * y_before
        torch.testing.assert_close(p.grad, u, rtol=1e-6, atol=1e-6)
        if k == 0 and wd == 0.0:  # every element of g/denom is +-1 on the first step
            assert p.grad.norm().item() == pytest.approx(math.sqrt(p.numel()), rel=1e-4)


UNTOUCHED = [(BY_ID[i], wd) for i in ("sf-ref", "sf-sgd-ref") for wd in (0.0, 0.01)] + [
    (BY_ID[i], 0.0) for i in ("sf-sgd-foreach", "sf-sgd-loop")
]


@pytest.mark.parametrize("case,wd", UNTOUCHED, ids=lambda v: getattr(v, "id", str(v)))
def test_grad_left_bit_identical(case, wd):
    model = make_model()
    opt = case.make(model.parameters(), weight_decay=wd)
    opt.train()
    for x, y in batches(3):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        objects = {p: p.grad for p in model.parameters()}
        before = _grads_before_step(model.parameters())
        opt.step()
        for p in model.parameters():
            assert p.grad is objects[p]
            assert torch.equal(p.grad, before[p])


@pytest.mark.parametrize(
    "case", [BY_ID["sf-sgd-foreach"], BY_ID["sf-sgd-loop"]], ids=lambda c: c.id
)
def test_sf_sgd_weight_decay_changes_every_element_but_not_the_norm(case):
    torch.manual_seed(8)
    p = torch.nn.Parameter(torch.randn(2000))
    opt = case.make([p], weight_decay=0.01)
    opt.train()
    g = torch.randn(2000)
    y_before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    assert bool((p.grad != g).all())
    torch.testing.assert_close(p.grad, g + 0.01 * y_before)
    assert abs(p.grad.norm().item() / g.norm().item() - 1) < 0.01


# ----------------------------------------------------------------------------- modes


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_starts_in_eval_mode_and_step_in_eval_mode_raises(case):
    model = make_model()
    opt = case.make(model.parameters())
    assert all(group["train_mode"] is False for group in opt.param_groups)
    loss_fn(model, *next(batches(1))).backward()
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        opt.step()
    assert opt.param_groups[0]["k"] == 0 and not opt.state  # nothing happened
    opt.train()
    opt.step()
    opt.eval()
    with pytest.raises(RuntimeError, match=r"train\(\)"):
        opt.step()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_train_eval_round_trip_restores_params(case):
    opt, model, y, x = run(case, 5)
    assert rel_err(x, y) > 1e-6  # x and y differ after training
    opt.eval()  # idempotent
    assert rel_err(snapshot(model), x) == 0
    opt.train()
    for a, b in zip(snapshot(model), y, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    opt.train()  # idempotent
    opt.eval()
    for a, b in zip(snapshot(model), x, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_param_group_added_in_train_mode_joins_it(case):
    model = make_model()
    extra = torch.nn.Parameter(torch.randn(4))
    opt = case.make(list(model.parameters()))
    opt.train()
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[-1]["train_mode"] is True
    extra.grad = torch.ones(4)
    opt.step()  # no "eval mode" error


# ----------------------------------------------------------------------------- step() API


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_closure_loss_is_returned_and_evaluated_with_grad(case):
    model = make_model()
    opt = case.make(model.parameters())
    opt.train()
    x, y = next(batches(1))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()  # would fail under the no_grad that wraps step()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() == pytest.approx(
        loss_fn(model, x, y).item(), abs=1.0
    )
    assert opt.step() is None


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_step_hooks_fire(case):
    model = make_model()
    opt = case.make(model.parameters())
    calls: list[tuple[str, int]] = []

    def pre(o, args, kwargs):
        calls.append(("pre", o.param_groups[0]["k"]))

    def post(o, args, kwargs):
        calls.append(("post", o.param_groups[0]["k"]))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    train(model, opt, 2)
    assert calls == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2)]
    for h in handles:
        h.remove()
    train(model, opt, 1)
    assert len(calls) == 4


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_params_without_grad_are_skipped(case):
    model = make_model()
    frozen = model[0].weight
    opt = case.make(model.parameters())
    opt.train()
    before = frozen.detach().clone()
    for x, y in batches(3):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen.detach(), before)
    assert len(opt.state[frozen]) == 0
    assert len(opt.state[model[2].weight]) > 0


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sparse_gradients_are_rejected(case):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = case.make(emb.parameters())
    opt.train()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_round_trip_continues_identically(case):
    model_a = make_model()
    opt_a = case.make(model_a.parameters(), warmup_steps=3, weight_decay=0.01)
    data = list(batches(8))
    opt_a.train()
    for x, y in data[:4]:
        opt_a.zero_grad()
        loss_fn(model_a, x, y).backward()
        opt_a.step()
    opt_a.eval()  # checkpoint in eval mode, as users are told to

    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model_b = make_model(seed=123)
    model_b.load_state_dict(saved["model"])
    opt_b = case.make(model_b.parameters())  # defaults: the state dict brings the real ones
    opt_b.load_state_dict(saved["opt"])
    for key in ("k", "weight_sum", "lr_max", "warmup_steps", "weight_decay", "train_mode"):
        assert opt_b.param_groups[0][key] == opt_a.param_groups[0][key]

    for model, opt in ((model_a, opt_a), (model_b, opt_b)):
        opt.train()
        for x, y in data[4:]:
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
        opt.eval()
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_smoke(case, dtype):
    model = make_model(dtype)
    before = snapshot(model)
    opt = case.make(model.parameters())
    train(model, opt, 5, dtype=dtype)
    opt.eval()
    after = snapshot(model)
    assert all(t.dtype == dtype and torch.isfinite(t).all() for t in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(t.dtype == dtype for s in opt.state.values() for t in s.values())


def test_foreach_none_means_foreach():
    assert AdamWScheduleFree([torch.nn.Parameter(torch.zeros(1))], foreach=None).defaults["foreach"]


def test_public_release_defaults():
    p = [torch.nn.Parameter(torch.zeros(1))]
    adam = AdamWScheduleFree(p).defaults
    assert (adam["lr"], adam["betas"], adam["eps"], adam["weight_decay"]) == (
        0.0025,
        (0.9, 0.999),
        1e-8,
        0,
    )
    sgd = SGDScheduleFree(p).defaults
    assert (sgd["lr"], sgd["momentum"], sgd["weight_decay"]) == (1.0, 0.9, 0)
    for d in (
        adam,
        sgd,
        AdamWScheduleFreeReference(p).defaults,
        SGDScheduleFreeReference(p).defaults,
    ):
        assert (d["warmup_steps"], d["r"], d["weight_lr_power"]) == (0, 0.0, 2.0)
    assert AdamWScheduleFreeReference(p).defaults["decay_at_z"] is False


# ----------------------------------------------------------------------------- validation

BAD: list[tuple[Callable[..., Any], dict[str, Any], str]] = []
for _cls in (
    AdamWScheduleFree,
    AdamWScheduleFreeReference,
    SGDScheduleFree,
    SGDScheduleFreeReference,
):
    BAD += [
        (_cls, {"lr": -1e-3}, "lr"),
        (_cls, {"lr": float("nan")}, "lr"),
        (_cls, {"weight_decay": -0.1}, "weight_decay"),
        (_cls, {"warmup_steps": -1}, "warmup_steps"),
        (_cls, {"warmup_steps": 2.5}, "warmup_steps"),
        (_cls, {"r": -1.0}, "r"),
        (_cls, {"weight_lr_power": -2.0}, "weight_lr_power"),
    ]
for _cls in (AdamWScheduleFree, AdamWScheduleFreeReference):
    BAD += [
        (_cls, {"betas": (1.0, 0.999)}, r"betas\[0\]"),
        (_cls, {"betas": (-0.1, 0.999)}, r"betas\[0\]"),
        (_cls, {"betas": (0.9, 1.0)}, r"betas\[1\]"),
        (_cls, {"betas": (0.9, -0.5)}, r"betas\[1\]"),
        (_cls, {"betas": (0.9,)}, "betas"),
        (_cls, {"eps": -1e-8}, "eps"),
    ]
BAD += [
    (AdamWScheduleFree, {"betas": (0.0, 0.999)}, r"betas\[0\].*dividing by beta1"),
    (SGDScheduleFree, {"momentum": 0.0}, "momentum.*dividing by momentum"),
    (SGDScheduleFree, {"momentum": 1.0}, "momentum"),
    (SGDScheduleFreeReference, {"momentum": 1.5}, "momentum"),
    (SGDScheduleFreeReference, {"momentum": -0.1}, "momentum"),
]


@pytest.mark.parametrize("cls,kwargs,name", BAD, ids=lambda v: getattr(v, "__name__", str(v)))
def test_invalid_hyperparameter_raises_value_error_naming_it(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_reference_forms_accept_zero_momentum():
    p = [torch.nn.Parameter(torch.zeros(2))]
    SGDScheduleFreeReference(p, momentum=0.0)
    AdamWScheduleFreeReference(p, betas=(0.0, 0.999))


# --------------------------------------------------------------------------- compile=True


def _sf_adamw_run(steps: int = 6, **kwargs: Any) -> list[torch.Tensor]:
    """Params and grads after ``steps`` steps on tensors of several shapes (one compile)."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((33, 17), (17,), (5,))]
    optimizer = AdamWScheduleFree(params, warmup_steps=2, **kwargs)
    optimizer.train()
    grad_gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grad_gen)
        optimizer.step()
    return [t.detach().clone() for p in params for t in (p, p.grad)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_compiled_kernel_matches_the_loop(weight_decay):
    compiled = _sf_adamw_run(compile=True, weight_decay=weight_decay)
    loop = _sf_adamw_run(foreach=False, weight_decay=weight_decay)
    for a, b in zip(compiled, loop, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compile_failure_warns_and_falls_back_to_foreach(monkeypatch):
    import sfdiag.optim.adamw as adamw_mod

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(adamw_mod, "_COMPILED", {"kernel": broken})
    with pytest.warns(RuntimeWarning, match="using the foreach path"):
        fallback = _sf_adamw_run(compile=True)
    foreach = _sf_adamw_run()
    assert all(torch.equal(a, b) for a, b in zip(fallback, foreach, strict=True))
