"""sfdiag.run.watch's per-step norms: what every step of a watched run pays, so kept to one
foreach norm and a stack, whatever the number of grads."""

from __future__ import annotations

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
