"""Values logged in a row are judged together (``sfdiag.run.logged.Moment``) only while
nothing they are judged by moved between the logging calls: a grad edited in place, or a
rate the script wrote, between two calls makes the second judged by what it saw."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from sfdiag.run import RunOptions, run_script

pytest.importorskip("tensorboard")

# argv: LOGDIR. Two micro-batches a step; after the first, two norms of the grads summed so
# far logged in a row, the grads halved in place between them. After step(), in a row, each
# group's rate and the rate the script then writes for the coming step: group 0's under the
# step just run (the write makes it ``next-step``), group 1's with no step number (the
# coming step's, judged at the last step by the rate as it stood when logged).
LOOP = """\
    import sys, torch
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}]
    optimizer = torch.optim.SGD(groups, lr=0.1)

    def norm():
        grads = [p.grad for p in model.parameters()]
        return float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))

    with SummaryWriter(sys.argv[1]) as writer:
        for step in range(6):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            writer.add_scalar("micro/grad_norm", norm(), step)
            for p in model.parameters():
                p.grad.mul_(0.5)
            writer.add_scalar("halved/grad_norm", norm(), step)
            model(torch.randn(8, 4)).pow(2).mean().backward()
            writer.add_scalar("grad_norm", norm(), step)
            optimizer.step()
            first, second = optimizer.param_groups
            writer.add_scalar("lr", first["lr"], step)
            first["lr"] *= 0.9
            writer.add_scalar("written/lr", first["lr"], step)
            writer.add_scalar("lr/group1", second["lr"])
            second["lr"] *= 0.9
            writer.add_scalar("coming/lr/group1", second["lr"])
"""


def test_values_logged_in_a_row_are_judged_by_what_each_saw(tmp_path: Path) -> None:
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(LOOP))
    report = tmp_path / "report.json"
    argv = ["python", str(script), str(tmp_path / "tb")]
    run_script(argv, RunOptions(report=report, force=True, quiet=True))
    metrics = {m["name"]: m for m in json.loads(report.read_text())["metrics"]}
    assert {name: m["verdict"] for name, m in metrics.items()} == {
        "micro/grad_norm": "partial-accumulation",
        "halved/grad_norm": "partial-accumulation",
        "grad_norm": "correct",
        "lr": "correct",
        "written/lr": "next-step",
        "lr/group1": "correct",
        "coming/lr/group1": "correct",
    }
    assert {m["steps_judged"] for m in metrics.values()} == {6}
