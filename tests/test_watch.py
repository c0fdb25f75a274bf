"""What every step pays: ``sfdiag run``'s per-step norms and ``GradMonitor``'s, each kept to
one foreach norm and a stack whatever the number of grads."""

from __future__ import annotations

import pytest
import torch
from test_snapshot import _TorchCalls

from sfdiag.run.watch import _norms


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


def test_grad_monitor_makes_no_torch_call_a_grad():
    """``GradMonitor`` reads the global norm in both hooks of every step: the same torch
    calls for 20 parameters as for 10."""
    from sfdiag.monitor import GradMonitor

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
