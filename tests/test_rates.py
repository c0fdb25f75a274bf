"""``sfdiag run`` judges the learning rates a script logs against the rate each ``step()``
applied (plain loops, real TensorBoard). HF ``Trainer`` and Lightning's
``LearningRateMonitor`` are driven for real in test_taps.py.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sfdiag.run import RunOptions, run_script
from sfdiag.run.metrics import STEP_KEYS, logged_step

pytest.importorskip("tensorboard")

# One loop, every way of logging a rate. argv: LOGDIR OPTIMIZER SCHEDULE WARMUP
#   OPTIMIZER: sf-adamw | sf-ref (schedule-free, warming up on their own for WARMUP steps;
#   sf-ref leaves p.grad alone) | adamw
#   SCHEDULE: decay | constant | warmup (a rising rate over 6 steps)
LOOP = """\
    import sys, torch
    from torch.utils.tensorboard import SummaryWriter
    from sfdiag.optim import AdamWScheduleFree, AdamWScheduleFreeReference

    logdir, kind, schedule, warmup = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    groups = [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 5e-4},
    ]
    if kind.startswith("sf-"):
        cls = AdamWScheduleFree if kind == "sf-adamw" else AdamWScheduleFreeReference
        optimizer = cls(groups, lr=1e-3, warmup_steps=warmup)
        optimizer.train()
    else:
        optimizer = torch.optim.AdamW(groups, lr=1e-3)
    factor = {
        "decay": lambda s: 0.9**s,
        "constant": lambda s: 1.0,
        "warmup": lambda s: min(1.0, s / 6),
    }[schedule]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    with SummaryWriter(logdir) as writer:
        for step in range(10):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            optimizer.step()
            group = optimizer.param_groups[0]
            writer.add_scalar("before/lr", scheduler.get_last_lr()[0], step)
            writer.add_scalar("counted/lr", scheduler.get_last_lr()[0], step + 1)  # steps done
            writer.add_scalar("lr/group1", scheduler.get_last_lr()[1], step)
            writer.add_scalar("applied/lr", group.get("scheduled_lr", group["lr"]), step)
            scheduler.step()
            writer.add_scalar("after/lr", scheduler.get_last_lr()[0], step)
            writer.add_scalar("after_unlabeled/lr", scheduler.get_last_lr()[0])
"""


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rates") / "loop.py"
    path.write_text(textwrap.dedent(LOOP))
    return str(path)


def run(tmp_path: Path, argv: list[str], **options) -> tuple[int, dict]:
    report = tmp_path / "report.json"
    code = run_script(argv, RunOptions(report=report, force=True, quiet=True, **options))
    return code, json.loads(report.read_text())


def audit(tmp_path: Path, loop: str, kind: str, schedule: str, warmup: int = 0, **options):
    argv = ["python", loop, str(tmp_path / "tb"), kind, schedule, str(warmup)]
    code, report = run(tmp_path, argv, **options)
    return code, report, {m["name"]: m for m in report["metrics"]}


def verdicts(metrics: dict[str, dict]) -> dict[str, str]:
    return {name: m["verdict"] for name, m in metrics.items() if m["quantity"] == "learning_rate"}


@pytest.mark.parametrize("kind", ["adamw", "sf-adamw"])
def test_get_last_lr_before_scheduler_step_is_correct_after_it_is_next_step(tmp_path, loop, kind):
    code, report, metrics = audit(tmp_path, loop, kind, "decay", strict=True)
    assert code == 1  # next-step fails --strict
    assert verdicts(metrics) == {
        "before/lr": "correct",
        "counted/lr": "correct",  # a step number that counts the steps done
        "lr/group1": "correct",  # judged against group 1's rate, not group 0's
        "applied/lr": "correct",
        "after/lr": "next-step",
        "after_unlabeled/lr": "next-step",
    }
    for name in verdicts(metrics):
        assert metrics[name]["steps_judged"] == 10  # the last value too: the run's end
    after = metrics["after/lr"]
    assert after["matches"] == "next-step" and "before scheduler.step()" in after["advice"]
    for example in after["examples"]:
        assert example["logged"] == pytest.approx(1e-3 * 0.9 ** (example["step"] + 1))
        assert example["applied"] == pytest.approx(1e-3 * 0.9 ** example["step"])
    assert metrics["lr/group1"]["examples"][0]["applied"] == pytest.approx(5e-4)
    assert report["findings"] == []


def test_a_constant_rate_logged_anywhere_is_correct(tmp_path, loop):
    code, report, metrics = audit(tmp_path, loop, "adamw", "constant", strict=True)
    assert code == 0
    assert set(verdicts(metrics).values()) == {"correct"}


def test_the_optimizers_own_warmup_makes_group_lr_the_base_rate(tmp_path, loop):
    code, report, metrics = audit(tmp_path, loop, "sf-adamw", "constant", warmup=4, strict=True)
    assert code == 1
    assert verdicts(metrics) == {
        "before/lr": "base-lr",
        "counted/lr": "base-lr",
        "lr/group1": "base-lr",
        "applied/lr": "correct",  # scheduled_lr: the rate the update used
        "after/lr": "base-lr",
        "after_unlabeled/lr": "base-lr",
    }
    base = metrics["before/lr"]
    (first,) = [e for e in base["examples"] if e["step"] == 0]
    assert first["applied"] == pytest.approx(1e-3 / 4) and first["base"] == 1e-3
    assert "scheduled_lr" in base["advice"] and "0.25x the base" in base["advice"]
    assert report["findings"] == []  # a constant schedule: the warmup is applied once


def test_a_rising_schedule_and_the_optimizers_own_warmup_is_a_double_warmup(tmp_path, loop):
    code, report, metrics = audit(tmp_path, loop, "sf-adamw", "warmup", warmup=6)
    (finding,) = report["findings"]
    assert (finding["kind"], finding["optimizer"], finding["first_step"], finding["count"]) == (
        "double-warmup",
        "AdamWScheduleFree",
        1,
        5,  # steps 1..5: the scheduler's rate rises while the optimizer warms up
    )
    # step 1: the scheduler gives 1/6 of 1e-3, the optimizer applies 2/6 of that
    assert "0.056x the base (5.56e-05 of 0.001)" in finding["advice"]
    assert "warmup applied twice" in finding["advice"]
    assert verdicts(metrics)["applied/lr"] == "correct"
    # a warning, not a failure: with only right metrics (and grads left alone), --strict
    # passes
    right = LOOP_RIGHT_ONLY.replace("{loop}", loop)
    script = tmp_path / "right.py"
    script.write_text(right)
    argv = ["python", str(script), str(tmp_path / "tb2"), "sf-ref", "warmup", "6"]
    code, report = run(tmp_path, argv, strict=True)
    assert [f["kind"] for f in report["findings"]] == ["double-warmup"]
    assert [(m["name"], m["verdict"]) for m in report["metrics"]] == [("applied/lr", "correct")]
    assert code == 0


# the same loop, logging only the applied rate
LOOP_RIGHT_ONLY = """\
import runpy, sys
from torch.utils.tensorboard import SummaryWriter
add_scalar = SummaryWriter.add_scalar
def only_applied(self, tag, *args, **kwargs):
    if tag == "applied/lr":
        return add_scalar(self, tag, *args, **kwargs)
SummaryWriter.add_scalar = only_applied
runpy.run_path("{loop}", run_name="__main__")
"""


def test_without_a_warmup_of_its_own_a_warmup_schedule_is_no_finding(tmp_path, loop):
    code, report, metrics = audit(tmp_path, loop, "sf-adamw", "warmup", warmup=0, strict=True)
    assert report["findings"] == []
    assert verdicts(metrics)["before/lr"] == "correct"


SCALING = """\
    import sys, torch
    from torch.utils.tensorboard import SummaryWriter

    class Scaled(torch.optim.SGD):
        # an optimizer that scales its rate by an estimate of its own, as Prodigy does
        def __init__(self, params, lr):
            super().__init__(params, lr=lr)
            for group in self.param_groups:
                group["d"] = 1e-6

    model = torch.nn.Linear(4, 1)
    rate = torch.tensor(0.01) if sys.argv[2] == "tensor" else 0.01
    optimizer = Scaled(model.parameters(), lr=rate)
    with SummaryWriter(sys.argv[1]) as writer:
        for step in range(4):
            optimizer.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            optimizer.step()
            writer.add_scalar("lr", optimizer.param_groups[0]["lr"], step)
"""


@pytest.mark.parametrize("rate", ["float", "tensor"])
def test_an_optimizer_that_scales_its_rate_further_is_judged_on_lr_and_says_so(tmp_path, rate):
    script = tmp_path / "scaled.py"
    script.write_text(textwrap.dedent(SCALING))
    code, report = run(tmp_path, ["python", str(script), str(tmp_path / "tb"), rate])
    (metric,) = report["metrics"]
    assert (metric["quantity"], metric["verdict"], metric["steps_judged"]) == (
        "learning_rate",
        "correct",
        4,
    )
    assert metric["logged_median"] == pytest.approx(0.01)
    assert "scales the rate it is given further by its own d" in metric["advice"]


# A rate the script sets itself, as nanoGPT does: at the top of each iteration for the
# step about to run ("top"), or after step() for the next one ("after"). No scheduler.
# argv: LOGDIR MODE
MANUAL = """\
    import math, sys, torch
    from torch.utils.tensorboard import SummaryWriter

    logdir, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def get_lr(it):  # warmup, then cosine decay
        if it < 3:
            return 1e-3 * (it + 1) / 3
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * min(1.0, (it - 3) / 6))) * 9e-4

    with SummaryWriter(logdir) as writer:
        for it in range(10):
            if mode == "top":
                lr = get_lr(it)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                writer.add_scalar("top/lr", lr, it)
                writer.add_scalar("top_unlabeled/lr", lr)
            optimizer.zero_grad(set_to_none=True)
            model(torch.randn(8, 4)).pow(2).mean().backward()
            optimizer.step()
            if mode == "after":
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(it + 1)
                writer.add_scalar("after/lr", optimizer.param_groups[0]["lr"], it)
                writer.add_scalar("after_next/lr", optimizer.param_groups[0]["lr"], it + 1)
                writer.add_scalar("after_unlabeled/lr", optimizer.param_groups[0]["lr"])
"""


@pytest.fixture(scope="module")
def manual(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("manual") / "manual.py"
    path.write_text(textwrap.dedent(MANUAL))
    return str(path)


def test_a_rate_set_for_the_coming_step_is_that_steps_with_or_without_its_number(tmp_path, manual):
    argv = ["python", manual, str(tmp_path / "tb"), "top"]
    code, report = run(tmp_path, argv, strict=True)
    metrics = {m["name"]: m for m in report["metrics"]}
    assert code == 0
    assert verdicts(metrics) == {"top/lr": "correct", "top_unlabeled/lr": "correct"}
    for metric in metrics.values():
        assert metric["steps_judged"] == 10  # the first, logged before any step, too
        for example in metric["examples"]:
            assert example["logged"] == pytest.approx(example["applied"])


def test_a_rate_written_after_step_and_logged_under_it_is_next_step_naming_the_write(
    tmp_path, manual
):
    argv = ["python", manual, str(tmp_path / "tb"), "after"]
    code, report = run(tmp_path, argv, strict=True)
    metrics = {m["name"]: m for m in report["metrics"]}
    assert code == 1
    assert verdicts(metrics) == {
        "after/lr": "next-step",  # labelled with the step just run
        "after_next/lr": "correct",  # with the number of the step it is for
        "after_unlabeled/lr": "correct",  # no number: the coming step's, as set
    }
    advice = metrics["after/lr"]["advice"]
    assert "wrote into param_groups" in advice and "that iteration's number" in advice
    assert "scheduler" not in advice  # the script has none
    for example in metrics["after/lr"]["examples"]:
        assert example["logged"] == pytest.approx(example["next_step"])


def test_a_rate_logged_after_scheduler_step_names_the_scheduler(tmp_path, loop):
    code, report, metrics = audit(tmp_path, loop, "adamw", "decay")
    assert "read after scheduler.step()" in metrics["after_unlabeled/lr"]["advice"]
    assert "param_groups" not in metrics["after/lr"]["advice"]


@pytest.mark.parametrize("key", sorted(STEP_KEYS))
@pytest.mark.parametrize("number", [7, 7.0, torch.tensor(7), np.int64(7)])
def test_a_step_key_inside_the_logged_dict_is_the_loggers_step(key, number):
    items = [("lr", 1e-3), (key, number)]
    assert logged_step(None, items) == 7
    assert logged_step(3, items) == 3  # step= wins
    assert logged_step(None, [("lr", 1e-3), (key, 7.5)]) is None  # not a step number
    assert logged_step(None, [("lr", 1e-3), (key, True)]) is None
    assert logged_step(None, [("lr", 1e-3), ("epoch", 7)]) is None  # not a step key


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s),
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2),
        lambda opt: torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=1),
                torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
            ],
            milestones=[1],
        ),
    ],
)
def test_every_torch_scheduler_stepping_is_heard_and_handed_on_unchanged(make):
    from sfdiag.run import schedulers

    def trained(tapped: bool) -> tuple[list[float], list[object]]:
        heard: list[object] = []
        undo = schedulers.install(heard.append) if tapped else (lambda: None)
        try:
            model = torch.nn.Linear(2, 1)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            scheduler = make(optimizer)
            rates = []
            for _ in range(4):
                optimizer.step()
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(1.0)  # never improves: the rate drops
                else:
                    scheduler.step()
                rates.append(optimizer.param_groups[0]["lr"])
            return rates, [h for h in heard if h is scheduler]
        finally:
            undo()

    plain, _ = trained(False)
    rates, heard = trained(True)
    assert rates == plain
    assert len(heard) >= 4
    assert not getattr(torch.optim.lr_scheduler.LRScheduler.step, "_sfdiag_tap", False)
