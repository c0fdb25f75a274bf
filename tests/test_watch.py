"""What every step pays: ``sfdiag run``'s per-step norms and ``GradMonitor``'s, each kept to
one foreach norm and a stack whatever the number of grads."""

from __future__ import annotations

import os
import sysconfig

import pytest
import torch
from test_snapshot import _TorchCalls

from sfdiag.run import norms as run_norms


def _norms(grads):
    """The per-step norms as a torch tensor (the kernel's read is a numpy array)."""
    return run_norms._as_torch(run_norms._norms(grads))


def test_the_per_step_norms_make_no_torch_call_a_grad():
    """On a GPU each dispatched call costs the host µs, at every step of a run: the norms of
    20 grads take the same calls as those of 10."""
    calls = {}
    for count in (10, 20):
        grads = [
            torch.randn(64, 64, generator=torch.Generator().manual_seed(k)) for k in range(count)
        ]
        _norms(grads)
        with _TorchCalls() as counter:
            norms = _norms(grads)
        calls[count] = counter.count
        torch.testing.assert_close(norms, torch.stack([g.norm() for g in grads]))
    assert calls[10] == calls[20]


def test_the_per_step_norms_of_missing_and_graph_carrying_grads():
    """A missing grad reads 0; a grad of ``create_graph=True`` is read without building a
    graph (the step hooks run with grad on)."""
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    (grad,) = torch.autograd.grad((w**3).sum(), w, create_graph=True)  # 3 w**2 = [3, 12]
    assert grad.requires_grad
    norms = _norms([None, grad, torch.ones(4)])
    assert not norms.requires_grad
    torch.testing.assert_close(norms, torch.tensor([0.0, 153.0**0.5, 2.0]))


def _versions(grads):
    return [g._version if g is not None else 0 for g in grads]


@pytest.mark.parametrize(
    "case", ["small", "with a missing grad", "large", "float64", "non-contiguous"]
)
def test_a_read_at_a_logging_call_gives_the_grads_whole_norm(case):
    """The whole-model norm a value logged between backward and ``step()`` is judged against:
    small CPU grads straight from the kernel's sums of squares, with no torch op (where the
    read runs cold, each costs µs); the others from their per-tensor norms. Either way the
    grads' norm, and the same read kept while they hold."""
    from sfdiag.run.norms import GradsRead
    from sfdiag.step_audit import fused

    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(16, 16, generator=gen), torch.randn(16, generator=gen)]
    if case == "with a missing grad":
        grads.insert(1, None)
    elif case == "large":
        grads.append(torch.randn(fused.SQUARES_MAX_ELEMENTS + 1, generator=gen))
    elif case == "float64":
        grads = [g.double() for g in grads]
    elif case == "non-contiguous":
        grads[0] = grads[0].t()
    read = GradsRead.now(grads, _versions(grads), backwards=1)
    present = [g for g in grads if g is not None]
    expected = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in present]))
    assert float(read.total()) == pytest.approx(float(expected), rel=1e-6)
    kernel_reads = case in ("small", "with a missing grad") and fused.broken() is None
    assert (read.norms is None) == kernel_reads
    if kernel_reads:
        with _TorchCalls() as counter:
            GradsRead.now(grads, _versions(grads), backwards=1).total()
        assert counter.count == 0
    params = [torch.nn.Parameter(torch.zeros_like(g if g is not None else grads[0])) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    assert GradsRead.of_params(read, params, backwards=1) is read
    grads[0].mul_(2)  # an in-place edit: read again
    again = GradsRead.of_params(read, params, backwards=1)
    assert again is not read and float(again.total()) > float(read.total())


def test_grad_monitor_makes_no_torch_call_a_grad():
    """``GradMonitor`` reads the global norm in both hooks of every step: the same torch
    calls for 20 parameters as for 10."""
    from sfdiag.step_audit.monitor import GradMonitor

    calls = {}
    for count in (10, 20):
        params = [torch.nn.Parameter(torch.randn(8)) for _ in range(count)]
        opt = torch.optim.SGD(params, lr=0.1)
        monitor = GradMonitor(opt)
        for p in params:
            p.grad = torch.ones(8)
        opt.step()
        with _TorchCalls() as counter:  # the monitor's two hooks, not SGD's own loop
            monitor._pre(opt, (), {})
            monitor._post(opt, (), {})
        calls[count] = counter.count
        assert monitor.last_grad_norm == pytest.approx((8.0 * count) ** 0.5, rel=1e-6)
        monitor.remove()
    assert calls[10] == calls[20]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kernel_reads_small_grads_sums_of_squares_as_float64(dtype):
    """The run's per-step norms of many small CPU grads: one call of the fused kernel, each
    grad's sum of squares within float32 rounding of a float64 one."""
    from sfdiag.step_audit import fused

    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=gen).to(dtype) for n in (1, 7, 8, 255, 4096, 65536)]
    squares = fused.plain_squares(grads)
    if squares is None:
        pytest.skip(f"no fused kernel here: {fused.broken()}")
    expected = torch.stack([g.double().square().sum() for g in grads])
    torch.testing.assert_close(squares, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(_norms(grads), expected.sqrt().float())


@pytest.mark.parametrize(
    "odd_one",
    [
        pytest.param(lambda: torch.randn(8, 8).t(), id="not contiguous"),
        pytest.param(lambda: torch.randn(8, dtype=torch.float64), id="another dtype"),
        pytest.param(lambda: torch.randn(fused_max() + 1), id="too large"),
        pytest.param(lambda: torch.nn.Parameter(torch.randn(8)), id="a subclass"),
        pytest.param(lambda: torch.randn(4, 4).to_sparse(), id="sparse"),
    ],
)
def test_grads_the_kernel_does_not_take_are_read_by_torch(odd_one):
    """One grad the C code cannot trust sends the list to torch's norm: the same norms."""
    from sfdiag.step_audit import fused

    grads = [torch.randn(16), odd_one(), torch.randn(3, 5)]
    assert fused.plain_squares(grads) is None
    assert not fused.squares_reads(grads[1])
    expected = torch.stack([g.to_dense().float().norm() for g in grads])
    torch.testing.assert_close(_norms(grads), expected)


def fused_max() -> int:
    from sfdiag.step_audit import fused

    return fused.SQUARES_MAX_ELEMENTS


def test_values_logged_in_a_row_share_one_read_of_the_grads():
    """Between backward and step(): values logged in a row read the grads once; a backward
    since, an in-place edit (clipping) or another tensor reads again."""
    from sfdiag.run.norms import GradsRead

    grads = [torch.randn(4), None, torch.randn(2, 3)]
    read = GradsRead.now(grads, _versions(grads), backwards=1)
    assert read.holds(grads, _versions(grads), 1)
    assert read.total() == pytest.approx(float(torch.cat([grads[0], grads[2].flatten()]).norm()))
    assert not read.holds(grads, _versions(grads), 2)  # a backward ran since
    grads[0].mul_(0.5)
    assert not read.holds(grads, _versions(grads), 1)  # edited in place: version moved
    swapped = [grads[0], None, grads[2].clone()]
    assert not read.holds(swapped, _versions(swapped), 1)  # another tensor


def test_each_step_knows_which_parameters_had_a_grad():
    """The parameters a step was given grads for, step by step, as they come and go (the set
    of all of them is kept between steps, one parameter missing a grad is not among them)."""
    from sfdiag.run.watch import OptimizerWatch

    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    opt = torch.optim.SGD(params, lr=0.1)
    watch = OptimizerWatch()
    watch.install()
    try:
        seen = []
        for missing in (None, 1, None, 0, None):
            for i, p in enumerate(params):
                p.grad = None if i == missing else torch.ones(3)
            opt.step()
            seen.append(watch.watched[0].recent[-1].with_grad)
    finally:
        watch.remove()
    everyone = frozenset({0, 1, 2})
    assert seen == [everyone, frozenset({0, 2}), everyone, frozenset({1, 2}), everyone]
    assert watch.watched[0].saw_whole


@pytest.mark.parametrize(
    "count, size",
    [(5, 8), (100, 8), (5, 70_000)],
    ids=["few small (a Python array)", "many small (numpy)", "large (torch)"],
)
def test_post_step_norms_read_later_patch_the_moved_grads_alone(count, size):
    """A step's post-step norms, read when a value needs them: the grads that moved read
    again, the others kept from before ``step()``; a grad written again since leaves them
    unknown (NaN). The same floats whichever path read the grads."""
    import math
    import weakref

    from sfdiag.run.norms import StepNorms

    def step_norms(grads, moved):
        pre = run_norms._norms(grads)
        norms = StepNorms(0, pre, pre)
        for i in moved:
            grads[i].mul_(2.0)  # what step() did to them
        norms._later = ([weakref.ref(g) for g in grads], _versions(grads), moved)
        return norms

    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(size, generator=gen) for _ in range(count)]
    before = [g.norm().item() for g in grads]
    pre, post = step_norms(grads, [1, 3]).floats()
    assert pre == pytest.approx(before, rel=1e-6)
    assert post == pytest.approx([b * (2 if i in (1, 3) else 1) for i, b in enumerate(before)])
    kept = [i for i in range(count) if i not in (1, 3)]
    assert [post[i] for i in kept] == [pre[i] for i in kept]  # kept, not read

    norms = step_norms(grads, [0])
    grads[0].add_(1.0)  # written again before any value needed the post-step norms
    pre, post = norms.floats()
    assert all(math.isnan(v) for v in post) and not any(math.isnan(v) for v in pre)

    many = step_norms(grads, list(range(count - 1)))  # most moved: all read again
    assert many.floats()[1] == pytest.approx([g.norm().item() for g in grads], rel=1e-6)


def _python_checks(monkeypatch):
    """The kernel's callers as they run where the checks' module was not built."""
    from sfdiag.step_audit import fused

    fused._library()
    if fused._KERNEL.checks is None:
        pytest.skip("the checks' module was not built here: the Python path is the only one")
    monkeypatch.setattr(fused._KERNEL, "checks", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count", [1, 2, 64, 65, 300])
def test_the_checks_in_c_give_the_python_paths_sums(dtype, count, monkeypatch):
    """``plain_squares.c`` checks and reads the grads as the Python path does: the same
    function, the same bits, for any count (on its stack or not) and dtype."""
    from sfdiag.step_audit import fused

    gen = torch.Generator().manual_seed(count)
    sizes = torch.randint(1, 4097, (count,), generator=gen).tolist()
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    in_c = fused.plain_squares_host(grads)
    include = sysconfig.get_paths().get("include")
    if fused.broken() is None and include and os.path.isfile(os.path.join(include, "Python.h")):
        assert fused._KERNEL.checks is not None  # built with the kernel: what ran was C
    _python_checks(monkeypatch)
    in_python = fused.plain_squares_host(grads)
    if in_python is None:
        assert in_c is None  # (float16 where this compiler has no _Float16)
        return
    assert in_c.tobytes() == in_python.tobytes()


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize(
    "odd_one",
    [
        pytest.param(lambda: torch.randn(8, 8).t(), id="not contiguous"),
        pytest.param(lambda: torch.randn(8, dtype=torch.float64), id="another dtype"),
        pytest.param(lambda: torch.randn(8, dtype=torch.float16), id="a second dtype"),
        pytest.param(lambda: torch.randn(fused_max() + 1), id="too large"),
        pytest.param(lambda: torch.nn.Parameter(torch.randn(8)), id="a subclass"),
        pytest.param(lambda: torch.randn(4, 4).to_sparse(), id="sparse"),
        pytest.param(lambda: torch.randn(4, 4).to_sparse_csr(), id="sparse csr"),
        pytest.param(lambda: torch.randn(4, 4)[:, :2], id="a strided view"),
    ],
)
def test_the_checks_in_c_refuse_what_the_python_path_refuses(odd_one, plain, monkeypatch):
    """One tensor the C code cannot trust: None from both paths (a subclass passes where the
    caller vouched for every one's type, ``plain``, as it does in Python)."""
    from sfdiag.step_audit import fused

    grads = [torch.randn(16), torch.randn(3, 5), odd_one()]
    in_c = fused.plain_squares_host(grads, plain=plain)
    _python_checks(monkeypatch)
    in_python = fused.plain_squares_host(grads, plain=plain)
    assert (in_c is None) == (in_python is None)
    if in_c is not None:
        assert in_c.tobytes() == in_python.tobytes()


class Marked(torch.Tensor):
    """A tensor subclass (its grads and params are read through their attributes)."""


def five_params() -> list[torch.nn.Parameter]:
    """Five params: the first four with a grad (the third's at version 2), the last none."""
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(5)]
    for p in params[:4]:
        p.grad = torch.ones(4)
    params[2].grad.mul_(2).add_(1)
    return params


def test_grads_and_their_versions_in_c_are_what_python_reads(monkeypatch):
    """``grads_of``/``weakrefs_of``: each param's grad, its version, whether all are plain
    tensors, weak references to them, from C as from Python."""
    from sfdiag.step_audit import fused

    params = five_params()
    cases = {"with a None": params, "all plain": params[:4]}
    subclassed = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
    subclassed[0].grad = torch.ones(4)
    subclassed[1].grad = torch.ones(4).as_subclass(Marked)
    cases["a subclass"] = subclassed
    in_c = {name: fused.grads_of(ps) for name, ps in cases.items()}
    refs_c = {name: fused.weakrefs_of(found[0]) for name, found in in_c.items()}
    _python_checks(monkeypatch)
    for name, ps in cases.items():
        grads, versions, plain = fused.grads_of(ps)
        assert [g is h for g, h in zip(grads, in_c[name][0], strict=True)] == [True] * len(ps)
        assert (versions, plain) == (in_c[name][1], in_c[name][2])
        refs = fused.weakrefs_of(grads)
        assert [r if r is None else r() for r in refs] == [
            r if r is None else r() for r in refs_c[name]
        ]
    assert in_c["with a None"][1] == [0, 0, 2, 0, 0] and not in_c["with a None"][2]
    assert in_c["all plain"][2] and not in_c["a subclass"][2]


def _intact_cases() -> dict[str, tuple[list, list, list, list]]:
    """(the tensors kept alive, their weak references, versions, moved indices) per case."""
    import weakref

    def case(edit=None, moved=(0, 1, 2)):
        grads = [torch.ones(3), None, torch.ones(2).as_subclass(Marked), torch.ones(4)]
        refs = [weakref.ref(g) if g is not None else None for g in grads]
        versions = [g._version if g is not None else 0 for g in grads]
        if edit is not None:
            edit(grads)
        return grads, refs, versions, list(moved)

    def replaced(grads):
        grads[0] = None  # (its only reference: the weak one dies)

    return {
        "as left": case(),
        "a moved grad edited": case(lambda g: g[0].add_(1)),
        "a subclassed grad edited": case(lambda g: g[2].add_(1)),
        "an unmoved grad edited": case(lambda g: g[3].add_(1)),
        "a moved grad gone": case(replaced),
        "nothing moved": case(replaced, moved=()),
    }


@pytest.mark.parametrize("name", list(_intact_cases()))
def test_intact_in_c_is_what_python_reads(name, monkeypatch):
    """``fused.intact``: the grads as they are now where every moved one is as it was left,
    else None, from C as from Python."""
    from sfdiag.step_audit import fused

    alive, refs, versions, moved = _intact_cases()[name]
    in_c = fused.intact(refs, versions, moved)
    _python_checks(monkeypatch)
    in_python = fused.intact(refs, versions, moved)
    expected = name in ("as left", "an unmoved grad edited", "nothing moved")
    assert (in_c is not None) == (in_python is not None) == expected
    if in_c is not None:
        assert all(a is b for a, b in zip(in_c, in_python, strict=True))
        assert all(a is b for a, b in zip(in_c, alive, strict=True))


@pytest.mark.parametrize("missing", ["Python's headers", "a GIL"])
def test_without_pythons_headers_or_a_gil_the_kernel_builds_alone(missing, monkeypatch, tmp_path):
    """Where Python's headers are missing, or Python runs free-threaded (the checks' module
    relies on the GIL: loading it would turn the GIL back on), the kernel's library builds
    all the same and the checks run in Python."""
    from sfdiag.step_audit import fused

    if fused._library() is None:
        pytest.skip(f"no fused kernel here: {fused.broken()}")
    monkeypatch.setenv("SFDIAG_CACHE_DIR", str(tmp_path / "cache"))  # (builds kept apart)
    if missing == "a GIL":
        config_var = sysconfig.get_config_var
        monkeypatch.setattr(
            sysconfig,
            "get_config_var",
            lambda name: 1 if name == "Py_GIL_DISABLED" else config_var(name),
        )
    else:
        paths = sysconfig.get_paths()
        monkeypatch.setattr(sysconfig, "get_paths", lambda: {**paths, "include": str(tmp_path)})
    lib, checks = fused._compile()
    assert checks is None and lib.sfdiag_squares_f32 is not None


def test_the_c_calls_keep_no_reference_to_what_they_read():
    """A reference the checks' module kept a call would hold every grad of a long run: after
    a thousand calls (refusals and errors among them) every count is what it was."""
    import array
    import gc
    import sys

    from sfdiag.step_audit import fused

    fused._library()
    checks = fused._KERNEL.checks
    if checks is None:
        pytest.skip("the checks' module was not built here")
    params = [torch.nn.Parameter(torch.randn(16)) for _ in range(70)]  # (off its stack)
    for p in params[:-1]:
        p.grad = torch.randn(16)
    grads = [p.grad for p in params[:-1]]
    odd = torch.randn(4, 4).t()
    # (not torch.Tensor's count: each tensor alive holds its type)
    watched = [*grads, *params, odd, torch.float32, torch.strided]
    gc.collect()  # (earlier tests' garbage, freed during the loop, would move torch's counts)
    before = [sys.getrefcount(x) for x in watched]
    for _ in range(1000):
        assert checks.squares(grads, array.array("d", bytes(8 * len(grads))), True)
        assert not checks.squares([*grads, odd], array.array("d", bytes(8 * 70)), True)
        found, versions, plain = checks.grads(params)
        assert not plain and found[:-1] == grads and versions == [0] * 69 + [0]
        checks.weakrefs(found)
        with pytest.raises(ValueError):
            checks.squares(grads, array.array("d", bytes(8)), True)
    del found, versions
    gc.collect()  # (the loop's own: pytest.raises' tracebacks)
    assert [sys.getrefcount(x) for x in watched] == before
