"""The taps on real clients: Lightning, the Hugging Face Trainer, W&B offline, MLflow's
local store and tensorboardX, each driven by ``sfdiag run`` in a subprocess (so the
packages are imported after the taps wait for them, as in a user's run).

The cases start together (each imports its framework, seconds apiece) and are read by
the tests below.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import cli_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CLIENTS = REPO / "tests" / "clients"
HF_EXAMPLE = str(REPO / "examples" / "train_hf_trainer.py")  # absolute: CLIENTS / it is it

NEEDS = {
    "lightning": ("lightning",),
    "lightning-clip": ("lightning",),
    "lightning-accumulate": ("lightning",),
    "hf": ("transformers", "accelerate", "schedulefree"),
    "hf-clip": ("transformers", "accelerate"),
    "hf-accumulate": ("transformers", "accelerate", "schedulefree"),
    "hf-warmup-constant": ("transformers", "accelerate", "schedulefree"),
    "hf-warmup-linear": ("transformers", "accelerate", "schedulefree"),
    "loggers": ("wandb", "mlflow", "tensorboardX"),
    "nanogpt": ("wandb",),
    "none": (),
}


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str
    report: dict

    def metrics(self) -> dict[str, dict]:
        return {m["name"]: m for m in self.report.get("metrics", [])}


HF_WARMUP = [HF_EXAMPLE, "{out}", "--lr", "1e-3", "--warmup-steps", "6"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Done]:
    tmp = tmp_path_factory.mktemp("taps")
    commands = {
        "lightning": ["lightning_grad_norms.py", "{out}", "--lr-monitor"],
        "lightning-clip": [
            "lightning_grad_norms.py",
            "{out}",
            "--clip",
            "0.05",
            "--optimizer",
            "adamw",
        ],
        # two micro-batches a step: norms logged after the first backward are partial sums
        "lightning-accumulate": [
            "lightning_grad_norms.py",
            "{out}",
            "--accumulate",
            "2",
            "--optimizer",
            "adamw",
        ],
        "hf": [HF_EXAMPLE, "{out}"],
        "hf-accumulate": [HF_EXAMPLE, "{out}", "--grad-accum", "4"],
        "hf-clip": [HF_EXAMPLE, "{out}", "--optim", "adamw_torch", "--max-grad-norm", "0.01"],
        # the optimizer warms up on its own (Trainer hands it warmup_steps)
        "hf-warmup-constant": [*HF_WARMUP, "--scheduler", "constant"],
        "hf-warmup-linear": [*HF_WARMUP, "--scheduler", "linear"],
        "loggers": ["wandb_mlflow_tbx.py", "{out}"],
        "nanogpt": ["nanogpt_loop.py", "{out}"],
        "none": ["no_loggers.py"],
    }
    env = cli_env(
        MLFLOW_ALLOW_FILE_STORE="true",
        WANDB_SILENT="true",
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    procs = {}
    for name, (script, *args) in commands.items():
        if not all(_installed(n) for n in NEEDS[name]):
            continue
        out = tmp / name
        out.mkdir()
        argv = [a.replace("{out}", str(out)) for a in args]
        procs[name] = (
            out,
            subprocess.Popen(
                [sys.executable, "-m", "sfdiag", "run", "--strict", "--report"]
                + [str(out / "report.json"), "--", "python", str(CLIENTS / script), *argv],
                cwd=out,
                env={**env, "WANDB_DIR": str(out)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    done = {}
    for name, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        report_file = out / "report.json"
        report = json.loads(report_file.read_text()) if report_file.exists() else {}
        done[name] = Done(proc.returncode, stdout, stderr, report)
    return done


def get(runs: dict[str, Done], name: str) -> Done:
    if name not in runs:
        pytest.skip(f"needs {', '.join(NEEDS[name])}")
    return runs[name]


def verdicts(metrics: dict[str, dict]) -> dict[str, str]:
    return {name: m["verdict"] for name, m in metrics.items()}


def test_lightning_grad_norm_hook_is_right_and_batch_end_is_post_step(runs):
    done = get(runs, "lightning")
    assert done.code == 1, done.stderr  # --strict: a post-step metric
    metrics = done.metrics()
    assert {m["logger"] for m in metrics.values()} == {"lightning"}  # no TensorBoard duplicates
    # LearningRateMonitor logs as a batch starts, the scheduler having moved on: right
    rate = metrics["lr-AdamWScheduleFree"]
    assert (rate["quantity"], rate["verdict"], rate["steps_judged"]) == (
        "learning_rate",
        "correct",
        16,
    )
    assert rate["examples"][-1]["logged"] == pytest.approx(1e-2 * 0.9**15)
    assert not any(name.endswith(("-momentum", "-weight_decay")) for name in metrics)
    total = metrics["grad_2.0_norm_total"]
    assert (total["verdict"], total["scope"], total["steps_judged"]) == ("correct", None, 16)
    for name in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
        metric = metrics[f"grad_2.0_norm/{name}"]
        assert (metric["verdict"], metric["scope"]) == ("correct", name)
    after = metrics["after_step/grad_norm"]
    assert (after["verdict"], after["matches"]) == ("post-step", "post-step")
    assert "on_before_optimizer_step" in after["advice"]
    assert "train_loss" not in metrics
    (row,) = done.report["results"]
    assert (row["verdict"], row["fingerprint"]) == ("mutated", "adam-normalized")


def test_lightning_clipping_is_seen_through(runs):
    done = get(runs, "lightning-clip")
    metrics = done.metrics()
    total = metrics["grad_2.0_norm_total"]  # logged before Lightning clips
    assert (total["verdict"], total["matches"]) == ("correct", "pre-clip")
    weight = metrics["grad_2.0_norm/net.0.weight"]
    assert (weight["verdict"], weight["matches"]) == ("correct", "pre-clip")
    after = metrics["after_step/grad_norm"]  # AdamW leaves grads alone: the clipped norm
    assert (after["verdict"], after["matches"]) == ("clipped", "post-clip")
    assert after["logged_median"] == pytest.approx(0.05, rel=1e-3)
    assert done.code == 0, done.stderr  # clipped is a note


def test_lightning_accumulation_a_norm_logged_after_each_backward_is_a_partial_sum(runs):
    done = get(runs, "lightning-accumulate")
    assert done.code == 1, done.stderr  # --strict: partial-accumulation is wrong
    metrics = done.metrics()
    # grad_norm(self) in on_before_optimizer_step: the summed gradient, once a step
    total = metrics["grad_2.0_norm_total"]
    assert (total["verdict"], total["steps_judged"]) == ("correct", 8)  # 16 batches / 2
    assert all(e["micro_batches"] == 2 for e in total["examples"])
    for name in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
        assert metrics[f"grad_2.0_norm/{name}"]["verdict"] == "correct"
    # on_after_backward: after the first micro-batch the grads hold its share alone (its
    # loss / 2), after the second the step's gradient
    backward = metrics["after_backward/grad_norm"]
    assert (backward["verdict"], backward["steps_judged"]) == ("partial-accumulation", 16)
    first = backward["examples"][0]
    assert first["step"] == 0 and first["micro_batches"] == 2
    assert first["logged"] == pytest.approx(first["at_log"], rel=1e-4)
    assert first["logged"] != pytest.approx(first["pre_step"], rel=1e-2)
    assert "on_before_optimizer_step" in backward["advice"]
    # on_train_batch_end: the first micro-batch's ends before step(); AdamW leaves p.grad
    # alone, so the second's (after step()) reads the gradient's norm
    after = metrics["after_step/grad_norm"]
    assert (after["verdict"], after["steps_judged"]) == ("partial-accumulation", 16)
    assert set(verdicts(metrics).values()) == {"correct", "partial-accumulation"}


def test_hf_trainer_grad_norm_is_right_with_gradient_accumulation(runs):
    done = get(runs, "hf-accumulate")
    assert done.code == 0, done.stderr  # --strict passes: the Trainer logs after the sum
    metrics = done.metrics()
    assert set(metrics) == {"grad_norm", "learning_rate"}
    grad_norm = metrics["grad_norm"]  # clip_grad_norm_'s return after the 4th backward
    assert (grad_norm["verdict"], grad_norm["matches"], grad_norm["steps_judged"]) == (
        "correct",
        "pre-clip",
        10,
    )
    assert all(e["micro_batches"] == 4 for e in grad_norm["examples"])
    rate = metrics["learning_rate"]
    assert (rate["verdict"], rate["steps_judged"]) == ("correct", 10)
    assert done.report["findings"] == []


def test_hf_trainer_grad_norm_is_right_with_schedule_free(runs):
    done = get(runs, "hf")
    assert done.code == 0, done.stderr  # --strict passes: the logged grad_norm is right
    metrics = done.metrics()
    assert set(metrics) == {"grad_norm", "learning_rate"}  # loss and epoch are not judged
    grad_norm = metrics["grad_norm"]
    assert (grad_norm["verdict"], grad_norm["logger"], grad_norm["steps_judged"]) == (
        "correct",
        "transformers",
        10,
    )
    # no warmup: the linear decay's rate, read before the scheduler steps, is the applied one
    rate = metrics["learning_rate"]
    assert (rate["quantity"], rate["verdict"], rate["steps_judged"]) == (
        "learning_rate",
        "correct",
        10,
    )
    assert [e["logged"] for e in rate["examples"]][-1] == pytest.approx(1e-3)  # 1e-2 * 1/10
    (row,) = done.report["results"]
    assert row["verdict"] == "mutated" and row["class"] == "schedulefree:AdamWScheduleFree"
    assert "are right" in row["advice"]
    assert done.report["findings"] == []


def test_hf_trainer_constant_schedule_logs_the_base_rate_through_the_optimizers_warmup(runs):
    done = get(runs, "hf-warmup-constant")
    assert done.code == 1, done.stderr  # --strict: base-lr is a wrong metric
    rate = done.metrics()["learning_rate"]
    assert (rate["verdict"], rate["matches"]) == ("base-lr", "base-lr")
    first = rate["examples"][0]  # step 1: the optimizer applied 2/6 of the base rate
    assert (first["step"], first["logged"], first["base"]) == (1, 1e-3, 1e-3)
    assert first["applied"] == pytest.approx(1e-3 * 2 / 6)
    assert "scheduled_lr" in rate["advice"]
    assert done.report["findings"] == []  # the scheduler does not warm up: no double warmup
    assert done.metrics()["grad_norm"]["verdict"] == "correct"


def test_hf_trainer_linear_schedule_and_the_optimizers_warmup_is_a_double_warmup(runs):
    done = get(runs, "hf-warmup-linear")
    (finding,) = done.report["findings"]
    assert (finding["kind"], finding["optimizer"], finding["first_step"], finding["count"]) == (
        "double-warmup",
        "AdamWScheduleFree",
        1,
        5,
    )
    # at step 1 the scheduler gives 1/6 of the rate and the optimizer applies 2/6 of that
    assert "0.056x the base" in finding["advice"] and "warmup applied twice" in finding["advice"]
    assert "warmup_steps=0" in finding["advice"]
    assert "double-warmup" in done.stdout + done.stderr
    assert done.metrics()["learning_rate"]["verdict"] == "base-lr"


def test_hf_trainer_grad_norm_is_the_pre_clip_norm(runs):
    done = get(runs, "hf-clip")
    assert done.code == 0, done.stderr
    grad_norm = done.metrics()["grad_norm"]
    assert (grad_norm["verdict"], grad_norm["matches"]) == ("correct", "pre-clip")
    assert grad_norm["logged_median"] > 0.1  # clipped to 0.01, logged unclipped
    assert all(e["pre_step"] == pytest.approx(0.01, rel=1e-3) for e in grad_norm["examples"])


def test_wandb_mlflow_and_tensorboardx(runs):
    done = get(runs, "loggers")
    assert done.code == 1, done.stderr
    metrics = done.metrics()
    expected = {
        "train/grad_norm": ("wandb", "correct"),
        "gnorm": ("mlflow", "correct"),
        "tbx/grad_norm": ("tensorboard", "correct"),
        "after/grad_norm": ("wandb", "post-step"),
        "after_gnorm": ("mlflow", "post-step"),
        "tbx_after/grad_norm": ("tensorboard", "post-step"),
        # learning rates: read before scheduler.step() (right), after it (the next step's)
        "train/lr": ("wandb", "correct"),
        "tbx/lr": ("tensorboard", "correct"),
        "lr": ("mlflow", "next-step"),
    }
    assert {n: (m["logger"], m["verdict"]) for n, m in metrics.items()} == expected
    assert all(m["steps_judged"] == 8 for m in metrics.values())
    assert all(e["logged"] == pytest.approx(e["next_step"]) for e in metrics["lr"]["examples"])


def test_nanogpts_loop_logs_the_rate_of_the_coming_step_and_that_is_correct(runs):
    done = get(runs, "nanogpt")
    assert done.code == 0, done.stderr  # --strict passes: nothing is wrong
    metrics = done.metrics()
    assert {n: (m["logger"], m["verdict"]) for n, m in metrics.items()} == {
        "lr": ("wandb", "correct"),  # under its "iter" key
        "train/lr": ("wandb", "correct"),  # with no step number: the coming step's
    }
    assert all(m["steps_judged"] == 7 for m in metrics.values())  # iterations 0, 4, ... 24
    assert "next-step" not in done.stderr and "scheduler" not in done.stderr


def test_loggers_the_script_does_not_use_are_never_imported(runs):
    done = get(runs, "none")
    assert done.code == 0, done.stderr
    assert json.loads(done.stdout) == []
    assert done.report["metrics"] == []
