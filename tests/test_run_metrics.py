"""``sfdiag run`` judges the gradient metrics a script logs (plain loops, real TensorBoard).

Lightning, Transformers, W&B and MLflow are driven for real in test_taps.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import cli_env

from sfdiag.run import RunOptions, run_script

pytest.importorskip("tensorboard")

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = str(REPO / "examples" / "train_tensorboard.py")


def run(tmp_path: Path, argv: list[str], **options) -> tuple[int, dict]:
    report = tmp_path / "report.json"
    code = run_script(argv, RunOptions(report=report, force=True, quiet=True, **options))
    return code, json.loads(report.read_text())


def by_name(report: dict) -> dict[str, dict]:
    return {m["name"]: m for m in report["metrics"]}


def write(tmp_path: Path, body: str, name: str = "train.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


# ---- the acceptance cases ------------------------------------------------------------------
def test_before_step_is_correct_after_step_is_post_step_and_strict_fails(tmp_path):
    argv = ["python", EXAMPLE, "--steps", "12", "--logdir", str(tmp_path / "tb")]
    code, report = run(tmp_path, argv, strict=True)
    assert code == 1
    metrics = by_name(report)
    assert set(metrics) == {"train/grad_norm", "train/grad_norm_after_step"}  # no loss
    right, wrong = metrics["train/grad_norm"], metrics["train/grad_norm_after_step"]
    assert (right["verdict"], right["matches"], right["steps_judged"]) == (
        "correct",
        "pre-step",
        12,
    )
    assert (wrong["verdict"], wrong["matches"], wrong["steps_judged"]) == (
        "post-step",
        "post-step",
        12,
    )
    assert right["logger"] == wrong["logger"] == "tensorboard"
    assert right["optimizer"] == wrong["optimizer"] == "AdamWScheduleFree"
    assert right["true_median"] == wrong["true_median"] == pytest.approx(right["logged_median"])
    assert wrong["ratio"] > 20 and "GradMonitor" in wrong["advice"] and right["advice"] is None
    for example in wrong["examples"]:
        assert example["logged"] == pytest.approx(example["post_step"], rel=1e-3)
        assert example["pre_clip"] is None
    # without --strict the script's own exit code stands
    assert run(tmp_path, argv)[0] == 0


def test_clipping_return_value_is_correct_and_the_clipped_norm_is_a_note(tmp_path):
    argv = [
        "python",
        EXAMPLE,
        "--steps",
        "10",
        "--optimizer",
        "adamw",
        "--clip",
        "0.05",
        "--logdir",
        str(tmp_path / "tb"),
    ]
    code, report = run(tmp_path, argv, strict=True, metrics=("train/clip_total",))
    assert code == 0  # clipped is a note, not a failure
    metrics = by_name(report)
    total = metrics["train/clip_total"]
    assert (total["verdict"], total["matches"]) == ("correct", "pre-clip")
    assert all(e["pre_clip"] == pytest.approx(e["logged"]) for e in total["examples"])
    for name in ("train/grad_norm", "train/grad_norm_after_step"):  # adamw: both read 0.05
        assert (metrics[name]["verdict"], metrics[name]["matches"]) == ("clipped", "post-clip")
        assert metrics[name]["logged_median"] == pytest.approx(0.05, rel=1e-3)
        assert "clip_grad_norm_" in metrics[name]["advice"]
    (row,) = report["results"]
    assert row["verdict"] == "clean"
    # the clip total is missed by the pattern: without --metric it is not judged
    report = run(tmp_path, argv)[1]
    assert "train/clip_total" not in by_name(report)


SPARSE_LOGGING = """\
    import sys, torch
    from torch.utils.tensorboard import SummaryWriter
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    writer = SummaryWriter(sys.argv[1])
    for step in range(300):
        optimizer.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        squared = sum(float(p.grad.pow(2).sum()) for p in model.parameters())
        per_param = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
        optimizer.step()
        if step % 50 == 0:
            writer.add_scalar("grad_norm", squared, step)  # the squared norm: no norm at all
            writer.add_scalar("gnorm", squared ** 0.5, step)
            writer.add_scalars("grad_2.0_norm", per_param, step)
            writer.add_scalar("grad_norm/0", per_param["0.weight"], step)  # a module's norm
    writer.close()
"""


def test_a_squared_norm_is_unmatched_and_every_logged_step_is_judged(tmp_path):
    script = write(tmp_path, SPARSE_LOGGING)
    code, report = run(tmp_path, ["python", script, str(tmp_path / "tb")], strict=True)
    assert code == 1
    metrics = by_name(report)
    squared = metrics["grad_norm"]
    assert squared["verdict"] == "unmatched" and squared["matches"] is None
    assert squared["steps_judged"] == 6  # every 50th step of 300, not the sampled audit steps
    assert squared["nearest"] == "pre-step" and "square" in squared["advice"]
    assert [e["step"] for e in squared["examples"]][0] == 0
    assert metrics["gnorm"]["verdict"] == "correct" and metrics["gnorm"]["steps_judged"] == 6
    # add_scalars("grad_2.0_norm", {name: ...}): each judged against its own parameter
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        metric = metrics[f"grad_2.0_norm/{name}"]
        assert (metric["verdict"], metric["scope"], metric["steps_judged"]) == ("correct", name, 6)
    # a module path: the norm over the module's parameters, 0.weight and 0.bias
    module = metrics["grad_norm/0"]
    assert module["scope"] == "0" and module["verdict"] == "unmatched"
    assert module["logged_median"] < module["true_median"]


BEFORE_FIRST_STEP = """\
    import sys, torch
    from torch.utils.tensorboard import SummaryWriter
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.Adam(model.parameters())
    with SummaryWriter(sys.argv[1]) as writer:
        for step in range(3):
            optimizer.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            writer.add_scalar("train/grad_norm", total, step)  # a tensor, before the first step
            writer.add_scalar("lr", optimizer.param_groups[0]["lr"], step)
            optimizer.step()
"""


def test_values_logged_before_the_first_step_and_tensors_are_judged(tmp_path):
    script = write(tmp_path, BEFORE_FIRST_STEP)
    code, report = run(tmp_path, ["python", script, str(tmp_path / "tb")], strict=True)
    assert code == 0
    metric, rate = report["metrics"]
    assert (metric["name"], metric["verdict"], metric["steps_judged"]) == (
        "train/grad_norm",
        "correct",
        3,
    )
    assert [e["step"] for e in metric["examples"]] == [0, 2]
    assert (rate["name"], rate["quantity"], rate["verdict"]) == ("lr", "learning_rate", "correct")


def test_a_mutating_optimizer_with_right_metrics_passes_strict_and_says_so(tmp_path, capsys):
    script = write(
        tmp_path,
        BEFORE_FIRST_STEP.replace(
            "torch.optim.Adam(model.parameters())",
            "__import__('sfdiag.optim').optim.AdamWScheduleFree(model.parameters()); "
            "optimizer.train()",
        ),
    )
    code, report = run(tmp_path, ["python", script, str(tmp_path / "tb")], strict=True)
    assert code == 0
    (row,) = report["results"]
    assert row["verdict"] == "mutated"
    assert "are right" in row["advice"] and "train/grad_norm" in row["advice"]
    # and with no gradient metric logged, the flagged optimizer fails --strict as before
    quiet = script.replace("train.py", "quiet.py")
    Path(quiet).write_text(Path(script).read_text().replace("train/grad_norm", "train/total"))
    code, report = run(tmp_path, ["python", quiet, str(tmp_path / "tb2")], strict=True)
    assert code == 1  # a learning rate logged (and right) is no gradient metric
    assert [(m["name"], m["quantity"]) for m in report["metrics"]] == [("lr", "learning_rate")]


def test_the_taps_change_nothing_the_logger_receives_and_are_removed(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard.writer import SummaryWriter

    original = SummaryWriter.add_scalar

    def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(logdir))
        events.Reload()
        return {
            tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]
        }

    args = [EXAMPLE, "--steps", "5", "--logdir"]
    subprocess.run([sys.executable, *args, str(tmp_path / "plain")], check=True, env=cli_env())
    run(tmp_path, ["python", *args, str(tmp_path / "audited")])
    plain, audited = scalars(tmp_path / "plain"), scalars(tmp_path / "audited")
    assert plain.keys() == {
        "train/loss",
        "train/grad_norm",
        "train/grad_norm_after_step",
    }
    assert plain == audited
    assert SummaryWriter.add_scalar is original


def test_unknown_options_before_the_script_are_a_usage_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sfdiag", "run", "--metirc", "x", "--", "python", "t.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(),
    )
    assert done.returncode == 2
    assert "--metirc" in done.stderr and "Traceback" not in done.stderr
    assert "script not found" not in done.stderr


@pytest.mark.parametrize("rtol", ["0", "1", "-1e-3", "nan"])
def test_bad_metric_rtol_is_a_usage_error(tmp_path, rtol):
    done = subprocess.run(
        [sys.executable, "-m", "sfdiag", "run", "--metric-rtol", rtol, "--", "python", EXAMPLE],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(),
    )
    assert done.returncode == 2 and "--metric-rtol" in done.stderr
    assert done.stdout == ""  # the script never ran


def test_cli_end_to_end_with_the_example(tmp_path):
    """The acceptance case from the command line: tables on stderr, report, exit 1."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sfdiag",
            "run",
            "--strict",
            "--report",
            str(tmp_path / "r.json"),
            "--",
            "python",
            EXAMPLE,
            "--steps",
            "6",
            "--logdir",
            str(tmp_path / "tb"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=cli_env(),
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("trained 6 steps")  # stdout is the script's alone
    err = done.stderr
    assert "logged metric" in err and "post-step" in err and "correct" in err
    assert "train/loss" not in err
    assert "2 logged gradient metrics: 1 correct, 1 post-step (wrong)" in err
    data = json.loads((tmp_path / "r.json").read_text())
    assert {m["verdict"] for m in data["metrics"]} == {"correct", "post-step"}


TWO_OPTIMIZERS = """\
    import sys, torch
    from torch.utils.tensorboard import SummaryWriter
    from sfdiag.optim import AdamWScheduleFree
    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    g_opt = AdamWScheduleFree(gen.parameters(), lr=1e-3)
    g_opt.train()
    d_opt = torch.optim.SGD(disc.parameters(), lr=0.1)

    def norm(module):
        norms = [p.grad.norm() for p in module.parameters()]
        return float(torch.linalg.vector_norm(torch.stack(norms)))

    with SummaryWriter(sys.argv[1]) as writer:
        for step in range(6):
            d_opt.zero_grad()
            disc(gen(torch.randn(8, 4)).detach()).mean().backward()
            writer.add_scalar("disc/grad_norm", norm(disc), step)
            d_opt.step()
            g_opt.zero_grad()
            disc(gen(torch.randn(8, 4))).mean().backward()
            g_opt.step()
            writer.add_scalar("gen/grad_norm", norm(gen), step)  # after step(): the update
            if step == 3:
                raise KeyboardInterrupt
"""


def test_each_metric_is_judged_against_its_own_optimizer_and_an_interrupt_keeps_them(tmp_path):
    script = write(tmp_path, TWO_OPTIMIZERS)
    code, report = run(tmp_path, ["python", script, str(tmp_path / "tb")], strict=True)
    assert code == 130 and report["interrupted"] is True
    metrics = by_name(report)
    disc, gen = metrics["disc/grad_norm"], metrics["gen/grad_norm"]
    assert (disc["optimizer"], disc["verdict"], disc["steps_judged"]) == ("SGD", "correct", 4)
    assert (gen["optimizer"], gen["verdict"], gen["steps_judged"]) == (
        "AdamWScheduleFree",
        "post-step",
        4,
    )


def test_an_empty_metric_name_is_a_usage_error(tmp_path):
    from sfdiag.errors import SfdiagError

    with pytest.raises(SfdiagError, match="--metric"):
        run_script(["python", EXAMPLE], RunOptions(metrics=(" ",)))


AFTER_ZERO_GRAD = """\
    import sys, torch
    from torch.utils.tensorboard import SummaryWriter
    from sfdiag.optim import AdamWScheduleFree
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = AdamWScheduleFree(model.parameters(), lr=1e-3)
    optimizer.train()
    with SummaryWriter(sys.argv[1]) as writer:
        for step in range(6):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            optimizer.step()
            norms = [p.grad.norm() for p in model.parameters()]
            after = float(torch.linalg.vector_norm(torch.stack(norms)))
            optimizer.zero_grad(set_to_none=False)  # zeroed in place: the bits are gone
            writer.add_scalar("grad_norm_after_step", after, step)
"""


def test_a_post_step_value_logged_after_zero_grad_is_caught_from_its_third_step(tmp_path):
    """Post-step norms are read when a value is logged after step(). Where the grads were
    written again first (here zeroed in place), the value is taken for the coming step's
    (a standard loop logs there: no extra read a step); once one is judged unmatched with its
    post-step norms lost, they are read in the hook from then on. The first value is judged
    after the second step ran, so two are unmatched and every later one is told apart."""
    script = write(tmp_path, AFTER_ZERO_GRAD)
    code, report = run(tmp_path, ["python", script, str(tmp_path / "tb")], strict=True)
    (metric,) = report["metrics"]
    assert metric["verdict"] == "unmatched" and metric["steps_judged"] == 6
    first, second, last = metric["examples"]
    assert first["post_step"] == "nan" and first["logged"] != pytest.approx(first["pre_step"])
    assert second["step"] == 2
    assert second["logged"] == pytest.approx(second["post_step"], rel=1e-3)
    assert last["step"] == 5 and last["logged"] == pytest.approx(last["post_step"], rel=1e-3)
    assert code == 1
