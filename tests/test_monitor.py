"""GradMonitor: the real grad norm of each step, read in the step pre-hook."""

from __future__ import annotations

import math

import mutators
import pytest
import torch

import sfdiag
from sfdiag.step_audit.monitor import GradMonitor


def hand_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach().double().flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads)))


def train(model, optimizer, steps: int = 3, seed: int = 0) -> list[float]:
    """Steps of MSE on random data; the grad norm by hand just before each step()."""
    torch.manual_seed(seed)
    norms = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(8, 5)).pow(2).mean().backward()
        norms.append(hand_norm(model))
        optimizer.step()
    return norms


def mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def test_exposed_on_the_package():
    assert sfdiag.GradMonitor is GradMonitor


@pytest.mark.parametrize(
    ("make", "mutates"),
    [
        (lambda ps: mutators.AdamNormalize(ps, lr=1e-2), True),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), False),
        (lambda ps: sfdiag_optim().AdamWScheduleFree(ps), True),
        (lambda ps: sfdiag_optim().AdamWScheduleFreeReference(ps), False),
    ],
    ids=["adam-normalize", "sgd", "sf-adamw", "sf-ref"],
)
def test_true_norm_matches_a_norm_taken_before_step(make, mutates):
    model = mlp()
    optimizer = make(model.parameters())
    if hasattr(optimizer, "train"):
        optimizer.train()
    monitor = GradMonitor(optimizer)
    expected = train(model, optimizer, steps=3)
    history = monitor.history
    assert monitor.steps == len(history) == 3
    assert [pre for pre, _ in history] == pytest.approx(expected, rel=1e-5)
    assert monitor.last_grad_norm == pytest.approx(expected[-1], rel=1e-5)
    assert monitor.mutated is mutates
    post = monitor.last_post_step_grad_norm
    if mutates:
        assert post > 5 * monitor.last_grad_norm  # what a naive logger would have reported
    else:
        assert post == monitor.last_grad_norm and all(a == b for a, b in history)
    assert post == pytest.approx(hand_norm(model), rel=1e-5)  # p.grad as step() left it


def sfdiag_optim():
    import sfdiag.optim

    return sfdiag.optim


def test_before_any_step():
    monitor = GradMonitor(torch.optim.SGD(mlp().parameters(), lr=0.1))
    assert math.isnan(monitor.last_grad_norm) and math.isnan(monitor.last_post_step_grad_norm)
    assert monitor.mutated is False and monitor.history == [] and monitor.steps == 0


def test_remove_detaches_the_hooks():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(optimizer)
    train(model, optimizer, steps=2)
    monitor.remove()
    monitor.remove()  # idempotent
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    train(model, optimizer, steps=2)
    assert monitor.steps == 2 and len(monitor.history) == 2  # still readable, not growing


def test_context_manager_removes_on_exit():
    model = mlp()
    optimizer = mutators.ScaleGrads(model.parameters())
    with GradMonitor(optimizer) as monitor:
        expected = train(model, optimizer, steps=2)
    assert not optimizer._optimizer_step_pre_hooks
    assert monitor.last_grad_norm == pytest.approx(expected[-1], rel=1e-5)
    assert monitor.last_post_step_grad_norm == pytest.approx(expected[-1] / 2, rel=1e-5)
    assert monitor.mutated


def test_without_history_keeps_only_the_last_step():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(optimizer, keep_history=False)
    expected = train(model, optimizer, steps=4)
    assert monitor.history == [] and monitor.steps == 4
    assert monitor.last_grad_norm == pytest.approx(expected[-1], rel=1e-5)


def test_nested_step_counts_once_and_cleared_grads_count_as_mutated():
    model = mlp()
    torch.optim.SGD(model.parameters(), lr=0.1)  # hooks SGD.step: ClearGrads.step nests it
    optimizer = mutators.ClearGrads(model.parameters())
    monitor = GradMonitor(optimizer)
    expected = train(model, optimizer, steps=2)
    assert monitor.steps == 2
    assert monitor.last_grad_norm == pytest.approx(expected[-1], rel=1e-5)
    assert monitor.last_post_step_grad_norm == 0.0 and monitor.mutated


def test_a_step_that_raised_does_not_stop_the_monitor():
    class FailsOnce(torch.optim.SGD):
        failed = False

        def step(self, closure=None):
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise RuntimeError("once")
            return super().step(closure)

    model = mlp()
    optimizer = FailsOnce(model.parameters(), lr=0.1)
    monitor = GradMonitor(optimizer)
    with pytest.raises(RuntimeError):
        train(model, optimizer, steps=1)
    expected = train(model, optimizer, steps=2)
    assert monitor.steps == 2
    assert monitor.last_grad_norm == pytest.approx(expected[-1], rel=1e-5)


def test_closure_grads_are_the_ones_measured():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(optimizer)
    x = torch.randn(8, 5)
    seen = []

    def closure():
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        seen.append(hand_norm(model))
        return loss

    optimizer.zero_grad(set_to_none=True)  # no grads before step(): the closure makes them
    optimizer.step(closure)
    assert monitor.last_grad_norm == pytest.approx(seen[-1], rel=1e-5)
    assert not monitor.mutated


def test_half_precision_grads_are_summed_in_float32():
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(optimizer)
    model(torch.randn(4, 64, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    expected = hand_norm(model)
    optimizer.step()
    assert monitor.last_grad_norm == pytest.approx(expected, rel=1e-4)


def test_hooks_do_not_sync(monkeypatch):
    """Norms stay on the device inside step(): no .item()/.tolist() in the hooks."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradMonitor(optimizer)
    calls = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        calls.append(1)
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() in a hook"))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: pytest.fail("float() in a hook"))
    x = torch.randn(8, 5)
    for _ in range(5):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    assert calls == []
    monkeypatch.undo()
    monitor.history  # noqa: B018 - reading syncs every pending step at once
    assert monitor.steps == 5 and len(monitor.history) == 5
