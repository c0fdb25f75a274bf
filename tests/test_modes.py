"""``sfdiag run``'s schedule-free mode findings: evaluating, saving and stepping in the
wrong mode, and BatchNorm statistics never recomputed at x."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from sfdiag.optim import (
    AdamWScheduleFree,
    AdamWScheduleFreeReference,
    SGDScheduleFree,
    SGDScheduleFreeReference,
)
from sfdiag.run import RunOptions, run_script
from sfdiag.run.modes import gap, train_mode_of

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = str(REPO / "examples" / "train_eval_modes.py")


def run(tmp_path: Path, argv: list[str], strict: bool = True) -> tuple[int, dict]:
    report = tmp_path / "report.json"
    code = run_script(argv, RunOptions(report=report, force=True, quiet=True, strict=strict))
    return code, json.loads(report.read_text())


def findings(report: dict) -> dict[str, dict]:
    return {f["kind"]: f for f in report["findings"]}


def example(tmp_path: Path, *flags: str) -> list[str]:
    return ["python", EXAMPLE, "--out", str(tmp_path / "model.pt"), *flags]


def test_evaluating_and_saving_in_train_mode_are_found_and_fail_strict(tmp_path):
    code, report = run(tmp_path, example(tmp_path, "--wrong", "--reference"))
    assert code == 1  # the reference form leaves p.grad alone: the findings fail it
    found = findings(report)
    assert set(found) == {"eval-in-train-mode", "checkpoint-in-train-mode"}
    evals = found["eval-in-train-mode"]
    assert (evals["optimizer"], evals["count"], evals["first_step"]) == (
        "AdamWScheduleFreeReference",
        4,  # one forward pass per evaluation, every 5th of 20 steps
        4,
    )
    assert 0 < evals["gap"] < 1
    assert "optimizer.eval()" in evals["advice"]
    saved = found["checkpoint-in-train-mode"]
    assert (saved["count"], saved["first_step"]) == (1, 19) and "gap" not in saved
    (row,) = report["results"]
    assert row["verdict"] == "clean"


@pytest.mark.parametrize(
    "flags", [(), ("--reference",), ("--batchnorm", "--refresh", "--reference")]
)
def test_the_documented_usage_has_no_finding(tmp_path, flags):
    code, report = run(tmp_path, example(tmp_path, *flags))
    assert report["findings"] == []
    if "--reference" in flags:
        assert code == 0


def test_batchnorm_statistics_never_refreshed_are_a_warning(tmp_path):
    code, report = run(tmp_path, example(tmp_path, "--batchnorm", "--reference"))
    assert code == 0  # a warning: --strict passes
    (stats,) = report["findings"]
    assert (stats["kind"], stats["count"], stats["first_step"]) == ("batchnorm-stats", 4, 4)
    assert "torch.no_grad()" in stats["advice"]


STEP_IN_EVAL = """\
    import torch, mutators
    model = torch.nn.Linear(4, 2)
    optimizer = mutators.LenientScheduleFree(model.parameters(), lr=0.1)
    optimizer.train()
    for step in range(6):
        if step == 3:
            optimizer.eval()  # ...and forgets optimizer.train(): steps 3-5 run at x
        optimizer.zero_grad()
        model(torch.ones(3, 4)).sum().backward()
        optimizer.step()
"""


def test_stepping_in_eval_mode_is_found(tmp_path):
    import mutators  # noqa: F401 - the script finds it in sys.modules

    script = tmp_path / "t.py"
    script.write_text(textwrap.dedent(STEP_IN_EVAL))
    code, report = run(tmp_path, ["python", str(script)])
    assert code == 1
    (finding,) = report["findings"]
    assert (finding["kind"], finding["count"], finding["first_step"]) == (
        "step-in-eval-mode",
        3,
        3,  # steps 3, 4 and 5
    )


CHECKPOINTS = """\
    import copy, sys, torch
    from safetensors.torch import save_file
    from sfdiag.optim import AdamWScheduleFree
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    clean = torch.nn.Linear(3, 3)  # no schedule-free optimizer: never hooked
    other = torch.optim.SGD(clean.parameters(), lr=0.1)
    optimizer = AdamWScheduleFree(model.parameters(), lr=0.1)
    optimizer.train()
    for _ in range(2):
        for opt, net, width in ((optimizer, model, 4), (other, clean, 3)):
            opt.zero_grad()
            net(torch.ones(2, width)).sum().backward()
            opt.step()
    # nothing of sfdiag's is stored on the modules: they copy, pickle and script as ever
    assert not clean._forward_pre_hooks and not model._forward_pre_hooks
    copy.deepcopy(model)
    out = sys.argv[1]
    torch.save(optimizer.state_dict(), out + "/opt.pt")  # no parameter in it: fine
    torch.save(clean.state_dict(), out + "/clean.pt")  # not the optimizer's: fine
    torch.save({"epoch": 1, "nested": [{"weights": model.state_dict()}]}, out + "/a.pt")
    torch.save(model, out + "/b.pt")
    save_file(model.state_dict(), out + "/c.safetensors")
    optimizer.eval()
    torch.save(model.state_dict(), out + "/x.pt")  # as documented: fine
"""


def test_every_way_of_saving_the_weights_in_train_mode_is_found(tmp_path):
    pytest.importorskip("safetensors")
    script = tmp_path / "t.py"
    script.write_text(textwrap.dedent(CHECKPOINTS))
    code, report = run(tmp_path, ["python", str(script), str(tmp_path)])
    (finding,) = report["findings"]
    assert (finding["kind"], finding["optimizer"], finding["count"], finding["first_step"]) == (
        "checkpoint-in-train-mode",
        "AdamWScheduleFree",
        3,
        1,
    )
    assert all((tmp_path / name).exists() for name in ("a.pt", "b.pt", "c.safetensors", "x.pt"))


def _release(name: str):
    schedulefree = pytest.importorskip("schedulefree")
    return getattr(schedulefree, name)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: AdamWScheduleFree(p, lr=0.05),
        lambda p: AdamWScheduleFreeReference(p, lr=0.05),
        lambda p: SGDScheduleFree(p, lr=0.05, momentum=0.8),
        lambda p: SGDScheduleFreeReference(p, lr=0.05, momentum=0.8),
        lambda p: _release("AdamWScheduleFree")(p, lr=0.05),
        lambda p: _release("SGDScheduleFree")(p, lr=0.05, momentum=0.8),
        lambda p: _release("AdamWScheduleFreeReference")(p, lr=0.05),
    ],
    ids=[
        "sf-adamw",
        "sf-ref",
        "sf-sgd",
        "sf-sgd-ref",
        "release-adamw",
        "release-sgd",
        "release-ref",
    ],
)
def test_the_gap_is_the_distance_between_x_and_y(make, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    optimizer = make(model.parameters())
    optimizer.train()
    assert train_mode_of(optimizer) is True
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 5)).pow(2).mean().backward()
        optimizer.step()
    measured = gap(optimizer)
    y = [p.detach().clone() for p in model.parameters()]
    optimizer.eval()  # the parameters become x
    assert train_mode_of(optimizer) is False
    x = [p.detach().clone() for p in model.parameters()]
    diff = torch.linalg.vector_norm(
        torch.stack([(a - b).norm() for a, b in zip(x, y, strict=True)])
    )
    norm = torch.linalg.vector_norm(torch.stack([a.norm() for a in x]))
    assert measured == pytest.approx(float(diff / norm), rel=1e-4)
    assert measured > 0


def test_optimizers_without_modes_have_none():
    model = torch.nn.Linear(2, 2)
    assert train_mode_of(torch.optim.AdamW(model.parameters())) is None
    assert train_mode_of(object()) is None
