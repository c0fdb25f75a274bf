"""The machinery under the taps: after-import callbacks, patches, the reentrancy guard, and
the clipping wrappers (which must hand torch exactly what it would have got)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from sfdiag.run import clipping
from sfdiag.run.taps import _hooks
from sfdiag.run.taps._hooks import Patches, guarded, standing_aside, when_imported


@pytest.fixture
def fresh_module(tmp_path, monkeypatch):
    """A module ``sfdiag_probe_mod`` that exists on disk but is not imported yet."""
    (tmp_path / "sfdiag_probe_mod.py").write_text("VALUE = 1\ndef log(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("sfdiag_probe_mod", None)
    yield "sfdiag_probe_mod"
    sys.modules.pop("sfdiag_probe_mod", None)


def test_callback_runs_after_the_module_body_once_imported(fresh_module):
    seen = []
    cancel = when_imported(fresh_module, lambda m: seen.append(m.VALUE))
    assert seen == [] and fresh_module not in sys.modules  # never imports it itself
    module = importlib.import_module(fresh_module)
    assert seen == [1]
    assert module.__spec__.loader.__class__.__name__ != "_NotifyingLoader"  # the real loader
    assert _hooks._finder is None  # nothing left waiting: the finder is gone
    cancel()


def test_callback_runs_at_once_for_an_imported_module():
    seen = []
    when_imported("json", lambda m: seen.append(m.__name__))
    assert seen == ["json"]


def test_cancel_leaves_no_finder_and_missing_packages_are_no_error(fresh_module):
    seen = []
    cancel = when_imported(fresh_module, seen.append)
    cancel_missing = when_imported("sfdiag_no_such_package_anywhere", seen.append)
    with pytest.raises(ImportError):
        importlib.import_module("sfdiag_no_such_package_anywhere")
    cancel()
    cancel_missing()
    assert _hooks._finder is None and _hooks._finder not in sys.meta_path
    importlib.import_module(fresh_module)
    assert seen == []


def test_a_failing_callback_never_breaks_the_import(fresh_module):
    def boom(module):
        raise RuntimeError("a logger we do not understand")

    when_imported(fresh_module, boom)
    assert importlib.import_module(fresh_module).VALUE == 1


class Owner:
    def log(self, x):
        return ("original", x)


def test_patches_undo_in_reverse_and_restore_inherited_attributes():
    class Child(Owner):
        pass

    patches = Patches()
    patches.set(Child, "log", lambda self, x: "first")
    patches.set(Child, "log", lambda self, x: "second")
    patches.set(Owner, "log", lambda self, x: "base")
    assert Child().log(1) == "second"
    patches.undo()
    assert "log" not in vars(Child) and Owner().log(1) == ("original", 1)


def test_guard_records_the_outermost_call_only():
    recorded = []
    active = [True]

    def inner_original(x):
        return x * 2

    inner = guarded(inner_original, lambda x: recorded.append(("inner", x)) or x * 2, lambda: True)

    def outer_original(x):
        return inner(x) + 1

    outer = guarded(
        outer_original, lambda x: recorded.append(("outer", x)) or outer_original(x), lambda: True
    )
    assert outer(3) == 7 and recorded == [("outer", 3)]
    assert inner(4) == 8 and recorded[-1] == ("inner", 4)
    quiet = standing_aside(lambda x: inner(x))
    assert quiet(5) == 10 and recorded[-1] == ("inner", 4)  # nothing recorded inside
    off = guarded(inner_original, lambda x: recorded.append("never"), lambda: active[0] and False)
    assert off(1) == 2 and "never" not in recorded


# ---- clipping --------------------------------------------------------------------------------
def _model_with_grads(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2))
    model(torch.randn(4, 5)).pow(2).sum().mul(50).backward()
    return model


def test_clip_wrappers_hand_torch_what_it_would_get_and_record_the_norm():
    plain, wrapped = _model_with_grads(), _model_with_grads()
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)

    log = clipping.ClipLog()
    patches = clipping.install(log, lambda: True)
    try:
        assert torch.nn.utils.clip_grad_norm_._sfdiag_tap
        assert torch.nn.utils.clip_grad.clip_grad_norm_ is torch.nn.utils.clip_grad_norm_
        got = torch.nn.utils.clip_grad_norm_((p for p in wrapped.parameters()), 0.1)  # generator
    finally:
        patches.undo()
    assert torch.equal(got, expected)
    for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    (call,) = log.calls
    assert call.ids == {id(p) for p in wrapped.parameters()}
    assert call.total_float() == pytest.approx(float(expected))
    assert call.coefficient() == pytest.approx(0.1 / float(expected), rel=1e-5)
    assert not getattr(torch.nn.utils.clip_grad_norm_, "_sfdiag_tap", False)  # undone


def test_the_halves_of_clipping_are_recorded_once_each():
    model = _model_with_grads()
    log = clipping.ClipLog()
    patches = clipping.install(log, lambda: True)
    try:
        grads = [p.grad for p in model.parameters()]
        total = torch.nn.utils.get_total_norm(grads)
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), 1.0, total)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # calls neither public half
    finally:
        patches.undo()
    measured, clipped, whole = log.calls
    assert measured.max_norm is None and measured.ids == {id(g) for g in grads}
    assert clipped.max_norm == 1.0 and whole.max_norm == 1.0
    assert log.latest_since(0, {id(p) for p in model.parameters()}) is whole
    assert log.latest_since(3, {id(p) for p in model.parameters()}) is None
    # the call that measured the grads, found by the grads themselves (None among them)
    assert log.latest_since(0, set(), [None, *grads]) is measured
    assert log.latest_since(0, set(), [None, grads[-1]]) is measured
    assert log.latest_since(1, set(), [None, *grads]) is None
    assert log.latest_since(0, {id(p) for p in model.parameters()}, grads) is whole


def test_clip_log_keeps_only_recent_calls():
    log = clipping.ClipLog(keep=3)
    for i in range(10):
        log.record(clipping.ClipCall(frozenset({i}), float(i), 1.0))
    assert len(log) == 10 and [c.total for c in log.calls] == [7.0, 8.0, 9.0]
    assert log.latest_since(0, {8}).total == 8.0
    assert log.latest_since(0, {2}) is None


def test_a_clip_over_params_or_their_grads_covers_them_in_set_operations():
    """The step's clipping call covers the parameters it was given, or their grads."""
    from sfdiag.run import clipping
    from sfdiag.run.watch import OptimizerWatch

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for kind in ("params", "grads", "half"):
        log = clipping.ClipLog()
        watch = OptimizerWatch(clips=log)
        watch.install()
        try:
            model(torch.randn(2, 3)).sum().backward()
            params = list(model.parameters())
            given = {
                "params": params,
                "grads": [p.grad for p in params],
                "half": params[:2],
            }[kind]
            total = torch.nn.utils.get_total_norm(given)
            log.record(clipping.ClipCall(frozenset(map(id, given)), total, 1e9))
            optimizer.step()
        finally:
            watch.remove()
        norms = watch.watched[0].recent[-1]
        expected = {0, 1} if kind == "half" else {0, 1, 2, 3}
        assert norms.clipped_indices == frozenset(expected), kind
        optimizer.zero_grad()
