"""``sfdiag run`` names why a logged gradient norm or rate is wrong where a mixed-precision
loop with gradient accumulation gets it wrong (issue 24): read before
``scaler.unscale_`` (``loss-scaled``), after a backward that is not the step's last
(``partial-accumulation``), a step late (``previous-step``), after ``zero_grad``
(``zeroed``), another param group's rate (``other-group``); a step the scaler skipped is
a note (``skipped-step``), and a scheduler stepped on it a warning
(``scheduler-on-skipped-step``). The loop is tests/clients/amp_loop.py, run in-process
(its docstring says what each logged value is); Lightning's and the HF Trainer's gradient
accumulation are driven for real in test_taps.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sfdiag.run import RunOptions, run_script

pytest.importorskip("tensorboard")

LOOP = str(Path(__file__).resolve().parent / "clients" / "amp_loop.py")
STEPS = 5  # amp_loop.py's default
MICRO = 4  # micro-batches a step
SCALE = 1024.0  # GradScaler(init_scale=1024)
LR = (1e-3, 5e-4)  # the param groups' rates

# what each name amp_loop.py logs is, by construction (see its docstring)
EXPECTED = {
    "micro/grad_norm": "partial-accumulation",
    "scaled/grad_norm": "loss-scaled",
    "grad_norm": "correct",
    "prev/grad_norm": "previous-step",
    "zeroed/grad_norm": "zeroed",
    "lr": "other-group",
    "lr/group1": "correct",
    "swapped/lr/group1": "other-group",
}


def audit(tmp_path: Path, *args: str, **options) -> tuple[int, dict, dict, dict]:
    """Run amp_loop.py under the audit: (exit code, report, metrics by name, the loop's
    own record of each step: clip_grad_norm_'s return, the scale, skipped or not)."""
    logdir = tmp_path / "tb"
    report_file = tmp_path / "report.json"
    argv = ["python", LOOP, str(logdir), *args]
    code = run_script(argv, RunOptions(report=report_file, force=True, quiet=True, **options))
    report = json.loads(report_file.read_text())
    record = json.loads((logdir / "norms.json").read_text())
    return code, report, {m["name"]: m for m in report["metrics"]}, record


def verdicts(metrics: dict[str, dict]) -> dict[str, str]:
    return {name: m["verdict"] for name, m in metrics.items()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_each_way_an_amp_loop_with_accumulation_logs_it_wrong_is_named(tmp_path, dtype):
    code, report, metrics, record = audit(tmp_path, "--dtype", dtype, strict=True)
    assert not any(record["skipped"])  # no overflow: every step ran at scale 1024
    assert verdicts(metrics) == EXPECTED
    assert code == 1
    assert report["findings"] == []
    clip = record["clip"]
    assert {n: m["quantity"] for n, m in metrics.items()} == {
        n: "learning_rate" if "lr" in n.split("/") else "grad_norm" for n in EXPECTED
    }
    assert {n: m["steps_judged"] for n, m in metrics.items()} == {
        "micro/grad_norm": STEPS * MICRO,  # one value per micro-batch
        "scaled/grad_norm": STEPS,
        "grad_norm": STEPS,
        "prev/grad_norm": STEPS - 1,  # from the second step on
        "zeroed/grad_norm": STEPS,
        "lr": STEPS,
        "lr/group1": STEPS,
        "swapped/lr/group1": STEPS,
    }

    right = metrics["grad_norm"]  # clip_grad_norm_ after unscale_: nothing clipped
    assert right["matches"] == "pre-clip"
    for example in right["examples"]:
        assert example["logged"] == pytest.approx(clip[example["step"]])
        assert example["pre_step"] == pytest.approx(example["logged"], rel=1e-4)
        assert example["loss_scale"] == SCALE
        assert example["micro_batches"] == MICRO

    scaled = metrics["scaled/grad_norm"]  # the scale times the gradient's norm, every step
    assert scaled["ratio"] == pytest.approx(SCALE, rel=1e-4)
    first = scaled["examples"][0]
    assert first["step"] == 0 and first["loss_scale"] == SCALE
    for example in scaled["examples"]:
        assert example["logged"] / example["pre_step"] == pytest.approx(SCALE, rel=1e-4)
        assert example["logged"] == pytest.approx(SCALE * clip[example["step"]], rel=1e-4)
        assert example["at_log"] == pytest.approx(example["logged"], rel=1e-4)
        assert example["micro_batches"] == MICRO
    assert "unscale_" in scaled["advice"]

    micro = metrics["micro/grad_norm"]
    first = micro["examples"][0]  # step 0, after its first backward: 1 micro-batch of 4
    assert first["step"] == 0
    assert first["at_log"] == pytest.approx(first["logged"], rel=1e-4)
    # neither the gradient's norm nor the scale times it: a partial sum (still scaled)
    assert not math.isclose(first["logged"], first["pre_step"], rel_tol=0.01)
    assert not math.isclose(first["logged"], SCALE * first["pre_step"], rel_tol=0.01)
    for example in micro["examples"]:
        assert (example["micro_batches"], example["loss_scale"]) == (MICRO, SCALE)

    late = metrics["prev/grad_norm"]  # step k logs step k - 1's norm
    for example in late["examples"]:
        assert example["logged"] == pytest.approx(clip[example["step"] - 1])
        assert not math.isclose(example["logged"], example["pre_step"], rel_tol=0.01)

    zeroed = metrics["zeroed/grad_norm"]
    assert zeroed["logged_median"] == 0
    for example in zeroed["examples"]:
        assert example["logged"] == 0 and example["pre_step"] > 0

    for name, logged, applied in [
        ("lr", LR[1], LR[0]),  # group 0 by its name, group 1's rate
        ("lr/group1", LR[1], LR[1]),
        ("swapped/lr/group1", LR[0], LR[1]),  # group 1 by its name, group 0's rate
    ]:
        for example in metrics[name]["examples"]:
            assert example["logged"] == pytest.approx(logged)
            assert example["applied"] == pytest.approx(applied)
    assert "group" in metrics["lr"]["advice"]


# each wrong number alone, beside the right ones: it alone fails --strict
@pytest.mark.parametrize("name", [n for n, v in EXPECTED.items() if v != "correct"])
def test_each_wrong_number_alone_fails_strict(tmp_path, name):
    code, report, metrics, _ = audit(tmp_path, "--log", f"grad_norm,lr/group1,{name}", strict=True)
    assert verdicts(metrics) == {
        "grad_norm": "correct",
        "lr/group1": "correct",
        name: EXPECTED[name],
    }
    assert code == 1


def test_the_right_numbers_of_an_amp_loop_pass_strict(tmp_path):
    code, report, metrics, _ = audit(tmp_path, "--log", "grad_norm,lr/group1", strict=True)
    assert verdicts(metrics) == {"grad_norm": "correct", "lr/group1": "correct"}
    assert code == 0


def test_a_step_the_scaler_skipped_is_a_note_and_its_nan_is_right(tmp_path):
    code, report, metrics, record = audit(
        tmp_path, "--log", "grad_norm", "--overflow-at", "2", strict=True
    )
    assert record["skipped"] == [False, False, True, False, False]
    assert math.isnan(record["clip"][2])  # clip_grad_norm_ of inf/NaN grads: NaN
    assert record["scale"] == [SCALE, SCALE, SCALE, SCALE / 2, SCALE / 2]  # backed off
    metric = metrics["grad_norm"]
    assert (metric["verdict"], metric["steps_judged"]) == ("skipped-step", STEPS)
    assert code == 0  # a note: --strict passes
    (skipped,) = [e for e in metric["examples"] if e.get("skipped")]
    assert skipped["step"] == 2 and skipped["logged"] == "nan"  # JSON: NaN as "nan"
    assert skipped["loss_scale"] == SCALE
    assert metric["examples"][0]["loss_scale"] == SCALE
    assert metric["examples"][-1]["loss_scale"] == SCALE / 2  # after update() backed off
    assert metric["examples"][-1]["logged"] == pytest.approx(record["clip"][-1])
    assert report["findings"] == []  # no scheduler


def test_a_scheduler_stepped_on_a_skipped_step_is_a_warning(tmp_path):
    code, report, metrics, record = audit(
        tmp_path, "--log", "grad_norm,lr/group1", "--overflow-at", "2", "--scheduler", strict=True
    )
    assert record["skipped"][2]
    (finding,) = report["findings"]
    assert (finding["kind"], finding["optimizer"], finding["first_step"], finding["count"]) == (
        "scheduler-on-skipped-step",
        "AdamW",
        2,
        1,
    )
    assert finding["advice"]
    assert metrics["grad_norm"]["verdict"] == "skipped-step"
    # the rate is read before scaler.step() each iteration: the rate each step that ran
    # applied (the scheduler moved on past step 2, which applied none: its value is noted)
    rate = metrics["lr/group1"]
    assert (rate["verdict"], rate["steps_judged"]) == ("skipped-step", STEPS)
    # (a step is the optimizer's: 4 ran in 5 iterations, the skipped attempt is numbered as
    # the step that ran next; the last iteration's rate is the one its step applied)
    first, last = rate["examples"][0], rate["examples"][-1]
    assert (first["step"], first["logged"]) == (0, pytest.approx(LR[1]))
    assert last["logged"] == pytest.approx(LR[1] * 0.9 ** (STEPS - 1))
    assert last["applied"] == pytest.approx(last["logged"])
    assert code == 0  # a warning: --strict passes

    # the same schedule without a skipped step: nothing to say
    plain = tmp_path / "plain"
    plain.mkdir()
    code, report, metrics, record = audit(plain, "--log", "grad_norm", "--scheduler")
    assert not any(record["skipped"])
    assert report["findings"] == []
    assert verdicts(metrics) == {"grad_norm": "correct"}


ACCUMULATING_IN_A_FUNCTION = """\
import sys
import torch
from torch.utils.tensorboard import SummaryWriter
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
writer = SummaryWriter(sys.argv[1])
def main():  # the optimizer is a local: freed when main() returns, before the last judging
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(5):
        opt.zero_grad()
        for micro in range(4):
            (model(torch.randn(8, 8)).pow(2).mean() / 4).backward()
            if micro == 0:
                norms = torch.stack([p.grad.norm() for p in model.parameters()])
                writer.add_scalar("grad_norm", float(norms.norm()), step)
        opt.step()
main()
"""


@pytest.mark.parametrize("where", ["in a function", "at module level"])
def test_a_value_judged_after_its_optimizer_was_freed_keeps_its_cause(tmp_path, where):
    """The last step's value is judged when the run ends; an optimizer local to a training
    function is gone by then, and the value still finds the norm read when it was logged."""
    source = ACCUMULATING_IN_A_FUNCTION
    if where == "at module level":
        source = source.replace("def main():", "if True:").replace("\nmain()\n", "\n")
    script = tmp_path / "accumulate.py"
    script.write_text(source)
    report_path = tmp_path / "report.json"
    run_script(
        ["python", str(script), str(tmp_path / "tb")], RunOptions(report=report_path, quiet=True)
    )
    (metric,) = json.loads(report_path.read_text())["metrics"]
    assert metric["verdict"] == "partial-accumulation" and metric["steps_judged"] == 5
    assert all("at_log" in example for example in metric["examples"])


CLIPPING = """\
import sys, torch
from torch.utils.tensorboard import SummaryWriter
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
writer = SummaryWriter(sys.argv[1])
for step in range(24):
    opt.zero_grad()
    model(torch.randn(16, 8)).pow(2).mean().mul(SCALE).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    writer.add_scalar("grad_norm", norm.item(), step)
    opt.step()
"""


@pytest.mark.parametrize("scale", [50.0, 1e-3], ids=["clipped", "under the limit"])
def test_the_optimizer_table_shows_the_gradients_norm_before_clipping(tmp_path, scale, capsys):
    """nanoGPT-style clipping: step() gets grads of norm 1, and the table's pre-step column
    shows the norm clip_grad_norm_ measured (the gradient's), marked, with a note; where no
    step was clipped, the plain pre-step norm, unmarked."""
    script = tmp_path / "clip.py"
    script.write_text(CLIPPING.replace("SCALE", repr(scale)))
    report_path = tmp_path / "report.json"
    run_script(["python", str(script), str(tmp_path / "tb")], RunOptions(report=report_path))
    table = capsys.readouterr().err
    (result,) = json.loads(report_path.read_text())["results"]
    (metric,) = json.loads(report_path.read_text())["metrics"]
    assert metric["verdict"] == "correct"
    audited = len(result["steps"])
    assert audited == 20 and all(s["pre_clip_grad_norm"] is not None for s in result["steps"])
    if scale > 1:
        assert result["clipped_steps"] == audited and all(s["clipped"] for s in result["steps"])
        assert result["pre_step_grad_norm"] == pytest.approx(1.0, rel=1e-4)
        assert result["pre_clip_grad_norm"] > 2
        assert "†" in table and f"clipped at {audited} of {audited} audited steps" in table
    else:
        assert result["clipped_steps"] == 0
        assert result["pre_clip_grad_norm"] == pytest.approx(result["pre_step_grad_norm"])
        assert "†" not in table


CLIPPED_THROUGH_DATA = """\
import sys, torch
from torch.utils.tensorboard import SummaryWriter
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
writer = SummaryWriter(sys.argv[1])
def total():
    return float(torch.stack([p.grad.norm() for p in model.parameters()]).norm())
for step in range(6):
    opt.zero_grad()
    model(torch.randn(16, 8)).pow(2).mean().mul(50).backward()
    before = total()
    writer.add_scalar("unclipped/grad_norm", before, step)
    for p in model.parameters():  # clipping by hand, through .data: no version moves
        p.grad.data.mul_(min(1.0, 1.0 / before))
    writer.add_scalar("grad_norm", total(), step)  # what step() gets: right
    opt.step()
"""


def test_a_norm_logged_after_an_edit_through_data_is_judged_against_the_steps_grads(tmp_path):
    """An edit through ``.data`` between two logged values moves no version counter: the
    norm read for the first value must not stand for the step's grads, or the right value
    logged after the edit would read wrong."""
    script = tmp_path / "data_clip.py"
    script.write_text(CLIPPED_THROUGH_DATA)
    report_path = tmp_path / "report.json"
    run_script(
        ["python", str(script), str(tmp_path / "tb")], RunOptions(report=report_path, quiet=True)
    )
    metrics = {m["name"]: m for m in json.loads(report_path.read_text())["metrics"]}
    assert metrics["grad_norm"]["verdict"] == "correct"
    assert metrics["grad_norm"]["steps_judged"] == 6
