"""sfdiag.integrations: the Lightning and Hugging Face Trainer callbacks on the real
frameworks (CPU), their results read back from the loggers' own files (TensorBoard event
files, the CSV logger's files, the W&B offline run, MLflow's file store), compared with
what ``sfdiag run`` finds in the same script (tests/clients/cb_lightning.py).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import cli_env

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "tests" / "clients" / "cb_lightning.py"

#: what the client's training is: sfdiag run and the callback must both say so
LIGHTNING_VERDICTS = {
    "sfdiag/AdamWScheduleFree/verdict": "mutated",
    "sfdiag/train/grad_norm/verdict": "correct",
    "sfdiag/train/grad_norm_after_step/verdict": "post-step",
}


def _installed(*names: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in names)


def _needs(*names: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not _installed(*names), reason=f"needs {', '.join(names)}")


def _lightning_client():
    spec = importlib.util.spec_from_file_location("sfdiag_cb_lightning", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def verdicts_of(report: dict) -> dict[str, str]:
    """A JSON report's verdicts, keyed as the callbacks log them."""
    out = {f"sfdiag/{r['optimizer']}/verdict": r["verdict"] for r in report["results"]}
    out.update({f"sfdiag/{m['name']}/verdict": m["verdict"] for m in report["metrics"]})
    return out


def tensorboard_entries(root: Path) -> tuple[dict[str, str], dict[str, float], set[str]]:
    """(texts, last scalars, image tags) of every event file under ``root``."""
    from tensorboard.backend.event_processing import event_accumulator

    texts: dict[str, str] = {}
    scalars: dict[str, float] = {}
    images: set[str] = set()
    guidance = {"tensors": 0, "scalars": 0, "images": 0}
    for run in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        accumulator = event_accumulator.EventAccumulator(str(run), size_guidance=guidance)
        accumulator.Reload()
        tags = accumulator.Tags()
        for tag in tags["tensors"]:
            if tag.endswith("/text_summary"):
                proto = accumulator.Tensors(tag)[-1].tensor_proto
                texts[tag.removesuffix("/text_summary")] = proto.string_val[0].decode()
        for tag in tags["scalars"]:
            scalars[tag] = accumulator.Scalars(tag)[-1].value
        images |= set(tags["images"])
    return texts, scalars, images


def wandb_summary(root: Path) -> dict[str, object]:
    """The summary of the W&B offline run under ``root``, read from its ``run-*.wandb``
    file (a LevelDB-style log of protobuf records: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = root.rglob("offline-run-*/run-*.wandb")
    raw = path.read_bytes()
    block, pos, pending, summary = 32768, 7, b"", {}
    while pos + 7 <= len(raw):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunk, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        if kind in (2, 3):  # first, middle
            pending += chunk
            continue
        data, pending = pending + chunk, b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
    return summary


def sfdiag_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("sfdiag:")]


# ---- no framework needed ----------------------------------------------------------------------
def test_importing_the_integrations_imports_no_framework():
    code = (
        "import sys, sfdiag, sfdiag.integrations\n"
        "heavy = {'torch', 'lightning', 'pytorch_lightning', 'transformers'}\n"
        "loaded = heavy & {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_options_are_checked_when_the_callback_is_made(tmp_path):
    from sfdiag.errors import SfdiagError
    from sfdiag.integrations import CallbackAudit

    with pytest.raises(SfdiagError, match="metric-rtol"):
        CallbackAudit(metric_rtol=2.0)
    with pytest.raises(SfdiagError, match="--metric"):
        CallbackAudit(metrics=[" "])
    audit = CallbackAudit(tmp_path / "r.json", plot=False)
    assert not audit.running and audit.report is None and not audit.plot_image
    assert audit.early_warnings(1000) == []  # nothing running: nothing to say


def test_logged_items_name_every_verdict_and_keep_the_worse_of_a_name_logged_twice():
    from sfdiag.integrations import failure_message, logged_items, mlflow_key
    from sfdiag.results import Finding, MetricResult, OptimizerResult, ProbeReport

    def metric(name: str, logger: str, verdict: str) -> MetricResult:
        return MetricResult(name, "grad_norm", logger, "SGD", 3, verdict, None, 1.0, 1.0, 1.0)

    report = ProbeReport(
        config={},
        results=(
            OptimizerResult("SGD", "torch.optim:SGD", "clean", 1.0, 1.0, 1.0),
            OptimizerResult("AdamW#2", "torch.optim:AdamW", "mutated", 1.0, 2.0, math.nan),
        ),
        sfdiag_version="0",
        torch_version="0",
        metrics=(
            metric("gnorm", "tensorboard", "correct"),
            metric("gnorm", "wandb", "post-step"),
            metric("lr/grad_norm", "lightning", "clipped"),
        ),
        findings=(Finding("eval-in-train-mode", "SGD", 3, 1, "..."),),
    )
    strings, numbers = logged_items(report)
    assert strings == {
        "sfdiag/SGD/verdict": "clean",
        "sfdiag/AdamW#2/verdict": "mutated",
        "sfdiag/gnorm/verdict": "post-step",
        "sfdiag/lr/grad_norm/verdict": "clipped",
        "sfdiag/SGD/findings": "eval-in-train-mode",
    }
    assert numbers == {  # a ratio that is not a number is left out
        "sfdiag/SGD/post_pre_ratio": 1.0,
        "sfdiag/gnorm/wrong": 1.0,
        "sfdiag/lr/grad_norm/wrong": 0.0,
    }
    assert mlflow_key("sfdiag/AdamW#2/verdict") == "sfdiag/AdamW_2/verdict"
    message = failure_message(report)
    assert "gnorm (wandb): post-step (wrong)" in message
    assert "SGD: eval-in-train-mode (from step 3)" in message
    assert message.index("post-step (wrong)") < message.index("gnorm (tensorboard): correct")


@_needs("tensorboard")
def test_sfdiag_audit_entered_after_the_optimizer_was_made_and_stepped(tmp_path):
    import torch
    from torch.utils.tensorboard import SummaryWriter

    import sfdiag
    from sfdiag.optim import AdamWScheduleFree

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = AdamWScheduleFree(model.parameters(), lr=1e-2)
    optimizer.train()
    x = torch.randn(16, 8)
    y = (x[:, 0] > 0).long()
    writer = SummaryWriter(str(tmp_path))

    def norm() -> float:
        norms = [p.grad.norm() for p in model.parameters()]
        return float(torch.linalg.vector_norm(torch.stack(norms)))

    def step(k: int) -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        writer.add_scalar("train/grad_norm", norm(), k)
        optimizer.step()
        writer.add_scalar("train/grad_norm_after_step", norm(), k)

    step(0)  # the optimizer exists and has state before the audit starts
    with sfdiag.audit(show=False) as audit:
        for k in range(1, 6):
            step(k)
    writer.close()
    assert verdicts_of(audit.report.to_dict()) == LIGHTNING_VERDICTS
    assert [m.steps_judged for m in audit.report.metrics] == [5, 5]


# ---- Lightning -----------------------------------------------------------------------------
@pytest.mark.slow
@_needs("lightning", "tensorboard")
def test_lightning_ddp_two_ranks_report_once_through_rank_0(tmp_path):
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(CLIENT), str(out), "--ddp", "--steps", "21", "--callback"]
        + ["--report", str(report)],
        cwd=tmp_path,
        env=cli_env(PYTHONWARNINGS="ignore::DeprecationWarning"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    assert err.count("logged metric") == 1  # one table, rank 0's
    assert err.count("sfdiag: after 20 steps") == 1  # one early warning
    assert err.index("sfdiag: after 20 steps") < err.index("training ended")
    job = json.loads(report.read_text())
    assert job["distributed"]["world_size"] == 2 and job["distributed"]["ranks_agree"] is True
    assert verdicts_of(job) == LIGHTNING_VERDICTS

    def logged(rank: int) -> set[str]:
        lines = (out / f"calls-rank{rank}.jsonl").read_text().splitlines()
        return {key for line in lines for key in json.loads(line)["values"]}

    assert "train/grad_norm" in logged(0) and "train/grad_norm" in logged(1)  # both log
    assert {k for k in logged(0) if k.endswith("/verdict")} == set(LIGHTNING_VERDICTS)
    assert not {k for k in logged(1) if k.startswith("sfdiag/")}  # rank 1: nothing of sfdiag's
    texts, _, _ = tensorboard_entries(out / "tb")
    assert {k: v for k, v in texts.items() if k != "sfdiag/report"} == LIGHTNING_VERDICTS


@pytest.mark.slow
@_needs("lightning", "tensorboard", "wandb", "mlflow", "matplotlib", "yaml")
def test_lightning_callback_logs_what_sfdiag_run_finds_and_strict_raises_at_the_end(
    tmp_path, monkeypatch, capsys
):
    import yaml

    from sfdiag.run import RunOptions, run_script

    # the same script under sfdiag run (in this process, as the CLI runs it)
    plain = tmp_path / "plain"
    plain.mkdir()
    argv = ["python", str(CLIENT), str(plain)]
    assert run_script(argv, RunOptions(report=plain / "report.json", quiet=True)) == 0
    assert verdicts_of(json.loads((plain / "report.json").read_text())) == LIGHTNING_VERDICTS

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = _lightning_client()
    from sfdiag.integrations.lightning import AuditFailed, SfdiagCallback, pl

    callback = SfdiagCallback(tmp_path / "callback.json", plot=True, show=False)
    warned_before_the_end = []

    class Clock(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            warned_before_the_end.append(len(sfdiag_warnings(caught)))

    out = tmp_path / "cb"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = client.trainer_for(str(out), 24, [callback, Clock()], wandb=True, mlflow=True)
        trainer.fit(client.Net(), client.loader())
    import wandb

    wandb.finish()
    written = json.loads((tmp_path / "callback.json").read_text())
    assert verdicts_of(written) == verdicts_of(callback.report.to_dict()) == LIGHTNING_VERDICTS
    ratio = callback.report.results[0].norm_ratio
    assert ratio > 5
    wrong = {"sfdiag/train/grad_norm/wrong": 0.0, "sfdiag/train/grad_norm_after_step/wrong": 1.0}

    # the early warning, through rank_zero_warn, once, before the training ended
    (message,) = sfdiag_warnings(caught)
    assert message.startswith("sfdiag: after 20 steps, the logged gradient metric ")
    assert "'train/grad_norm_after_step' (lightning) reads post-step" in message
    assert warned_before_the_end == [1]

    texts, scalars, images = tensorboard_entries(out / "tb")
    report_text = texts.pop("sfdiag/report")
    assert texts == LIGHTNING_VERDICTS
    assert "train/grad_norm_after_step" in report_text and "post-step" in report_text
    assert scalars["sfdiag/AdamWScheduleFree/post_pre_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert {k: v for k, v in scalars.items() if k.endswith("/wrong")} == wrong
    assert images == {"sfdiag/plot"}

    (version,) = (out / "csv").iterdir()
    rows = list(csv.DictReader((version / "metrics.csv").open()))
    (last,) = [r for r in rows if r.get("sfdiag/AdamWScheduleFree/post_pre_ratio")]
    assert float(last["sfdiag/AdamWScheduleFree/post_pre_ratio"]) == pytest.approx(ratio)
    assert {k: float(last[k]) for k in wrong} == wrong
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert {k: v for k, v in hparams.items() if k.startswith("sfdiag/")} == LIGHTNING_VERDICTS

    summary = wandb_summary(out / "wandb")
    assert {k: v for k, v in summary.items() if k.endswith("/verdict")} == LIGHTNING_VERDICTS
    assert summary["sfdiag/AdamWScheduleFree/post_pre_ratio"] == pytest.approx(ratio)
    assert summary["sfdiag/plot/_type"] == "image-file"

    from mlflow.tracking import MlflowClient

    mlflow_logger = trainer.loggers[-1]
    store = MlflowClient(tracking_uri=mlflow_logger._tracking_uri)
    data = store.get_run(mlflow_logger.run_id).data
    assert {k: v for k, v in data.tags.items() if k.startswith("sfdiag/")} == LIGHTNING_VERDICTS
    assert data.metrics["sfdiag/AdamWScheduleFree/post_pre_ratio"] == pytest.approx(ratio)
    artifacts = [a.path for a in store.list_artifacts(mlflow_logger.run_id, "sfdiag")]
    assert artifacts == ["sfdiag/sfdiag-plot.png"]

    # strict=True: raised once the training ended and its last checkpoint was saved
    strict = tmp_path / "strict"
    saves = pl.callbacks.ModelCheckpoint(dirpath=strict / "ckpt", save_last=True)
    callbacks = [SfdiagCallback(strict=True, show=False), saves]
    trainer = client.trainer_for(str(strict), 4, callbacks, enable_checkpointing=True)
    capsys.readouterr()
    with pytest.raises(AuditFailed) as raised:
        trainer.fit(client.Net(), client.loader())
    assert trainer.global_step == 4
    assert (strict / "ckpt" / "last.ckpt").exists()
    assert "training ended" in capsys.readouterr().err  # on_train_end ran, then the raise
    message = str(raised.value)
    assert "train/grad_norm_after_step (lightning): post-step (wrong)" in message
    assert "train/grad_norm (lightning): correct" in message
    # the audit ran until the end: it saw the last checkpoint saved in train mode
    assert "AdamWScheduleFree: checkpoint-in-train-mode" in message
    assert raised.value.report.any_wrong_metric
    texts, _, _ = tensorboard_entries(strict / "tb")  # logged before the raise
    assert texts["sfdiag/train/grad_norm_after_step/verdict"] == "post-step"


# ---- the Hugging Face Trainer ------------------------------------------------------------------
@pytest.mark.slow
@_needs("transformers", "accelerate", "schedulefree", "tensorboard")
def test_hf_trainer_callback_reports_through_report_to_and_strict_raises_at_the_end(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from sfdiag.integrations.transformers import AuditFailed, SfdiagCallback

    class TinyConfig(PretrainedConfig):
        model_type = "sfdiag-tiny"

        def __init__(self, width: int = 16, **kwargs):
            self.width = width
            super().__init__(**kwargs)

    class Tiny(PreTrainedModel):
        config_class = TinyConfig

        def __init__(self, config):
            super().__init__(config)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, config.width), torch.nn.ReLU(), torch.nn.Linear(config.width, 2)
            )
            self.post_init()

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            generator = torch.Generator().manual_seed(0)
            self.x = torch.randn(64, 8, generator=generator)
            self.y = (self.x[:, 0] > 0).long()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    heard: list[str] = []

    class Heard(logging.Handler):
        def emit(self, record):
            heard.append(record.getMessage())

    warned_before_the_end = []

    class Clock(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            warned_before_the_end.append(len(heard))

    handler = Heard()
    hf_logger = logging.getLogger("transformers.sfdiag")
    hf_logger.addHandler(handler)
    try:
        torch.manual_seed(0)
        args = TrainingArguments(
            output_dir=str(tmp_path),
            optim="schedule_free_adamw",
            warmup_steps=4,  # the optimizer warms up on its own: the logged rate is the base
            lr_scheduler_type="constant",
            learning_rate=1e-3,
            max_steps=22,
            per_device_train_batch_size=8,
            logging_steps=1,
            report_to=["tensorboard"],
            save_strategy="steps",
            save_steps=11,
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        callback = SfdiagCallback(strict=True, show=False)
        trainer = Trainer(
            model=Tiny(TinyConfig()), args=args, train_dataset=Data(), callbacks=[callback, Clock()]
        )
        with pytest.raises(AuditFailed) as raised:
            trainer.train()
    finally:
        hf_logger.removeHandler(handler)
    assert trainer.state.global_step == 22 and (tmp_path / "checkpoint-22").is_dir()
    assert "learning_rate (transformers): base-lr (wrong)" in str(raised.value)
    report = callback.report
    metrics = {m.name: m for m in report.metrics}
    grad_norm = metrics["grad_norm"]
    assert (grad_norm.verdict, grad_norm.logger) == ("correct", "transformers")
    assert metrics["learning_rate"].verdict == "base-lr"
    (result,) = report.results
    assert result.verdict == "mutated"

    # the Trainer's own TensorBoard writer took the entries before it was closed
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1
    texts, scalars, _ = tensorboard_entries(tmp_path)
    assert {k: v for k, v in texts.items() if k.endswith("/verdict")} == {
        "sfdiag/AdamWScheduleFree/verdict": "mutated",
        "sfdiag/grad_norm/verdict": "correct",
        "sfdiag/learning_rate/verdict": "base-lr",
    }
    assert scalars["sfdiag/AdamWScheduleFree/post_pre_ratio"] == pytest.approx(result.norm_ratio)
    assert scalars["sfdiag/learning_rate/wrong"] == 1.0

    (message,) = heard  # through the transformers logger, once, before the training ended
    assert message.startswith("sfdiag: after 20 steps, the logged learning rate 'learning_rate'")
    assert "reads base-lr" in message
    assert warned_before_the_end == [1]
