"""Lightning trained with sfdiag's callback (or without it, for ``sfdiag run``): schedule-free
AdamW, a gradient norm logged in on_before_optimizer_step (right) and one logged in
on_train_batch_end, after step() (post-step).

    python cb_lightning.py OUTDIR [--steps N] [--callback] [--strict] [--plot] [--wandb]
                                  [--mlflow] [--ddp] [--report FILE]

Loggers: TensorBoard and CSV under OUTDIR (W&B offline with --wandb, MLflow's file store
with --mlflow), and a logger that records every call on every rank in
OUTDIR/calls-rank<R>.jsonl (Lightning's own loggers write on rank 0 only, so this one shows
what each rank was asked to log). With --ddp: 2 CPU processes (gloo, strategy="ddp").
"training ended" goes to stderr in on_train_end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import Logger

from sfdiag.optim import AdamWScheduleFree


def global_norm(module: torch.nn.Module) -> torch.Tensor:
    norms = [p.grad.norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.log("train/grad_norm", global_norm(self))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log("train/grad_norm_after_step", global_norm(self))

    def on_train_epoch_start(self):
        self.trainer.optimizers[0].train()

    def configure_optimizers(self):
        return AdamWScheduleFree(self.parameters(), lr=1e-2)


class Recording(Logger):
    """Every call, on every rank, one JSON line each."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def _write(self, kind: str, values: dict) -> None:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        path = os.path.join(self.directory, f"calls-rank{rank}.jsonl")
        with open(path, "a") as out:
            out.write(json.dumps({"kind": kind, "values": values}, default=str) + "\n")

    def log_metrics(self, metrics, step=None):
        self._write("metrics", {k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, params, *args, **kwargs):
        self._write("hyperparams", dict(params) if isinstance(params, dict) else {})


class Ended(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            print("training ended", file=sys.stderr, flush=True)


def loader() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = (x[:, 0] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def trainer_for(
    outdir: str, steps: int, callbacks: list, wandb: bool = False, mlflow: bool = False, **extra
) -> Any:
    loggers = [
        pl.loggers.TensorBoardLogger(outdir, name="tb"),
        pl.loggers.CSVLogger(outdir, name="csv"),
        Recording(outdir),
    ]
    if wandb:
        loggers.append(pl.loggers.WandbLogger(project="sfdiag-test", save_dir=outdir))
    if mlflow:
        uri = "file://" + os.path.join(outdir, "mlruns")
        loggers.append(pl.loggers.MLFlowLogger("sfdiag-test", tracking_uri=uri))
    options = {
        "max_steps": steps,
        "logger": loggers,
        "log_every_n_steps": 1,
        "callbacks": [*callbacks, Ended()],
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    options.update(extra)
    return pl.Trainer(**options)


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--callback", action="store_true")
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--wandb", action="store_true")
    parser.add_argument("--mlflow", action="store_true")
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--report", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    callbacks = []
    if args.callback:
        from sfdiag.integrations.lightning import SfdiagCallback

        callback = SfdiagCallback(args.report, plot=args.plot or None, strict=args.strict)
        callbacks.append(callback)
    extra = {"strategy": "ddp", "devices": 2} if args.ddp else {}
    trainer = trainer_for(args.outdir, args.steps, callbacks, args.wandb, args.mlflow, **extra)
    trainer.fit(Net(), loader())
    return trainer


if __name__ == "__main__":
    main()
