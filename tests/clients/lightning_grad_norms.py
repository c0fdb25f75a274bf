"""Lightning: grad_norm(self) logged in on_before_optimizer_step (right) and a norm logged
in on_train_batch_end, after step() (wrong with schedule-free AdamW). With --lr-monitor,
a per-step decaying schedule and LearningRateMonitor logging its rate (right).

    python lightning_grad_norms.py LOGDIR [--clip X] [--optimizer sf-adamw|adamw]
                                          [--lr-monitor]
"""

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm

from sfdiag.optim import AdamWScheduleFree

parser = argparse.ArgumentParser()
parser.add_argument("logdir")
parser.add_argument("--clip", type=float, default=None)
parser.add_argument("--optimizer", default="sf-adamw")
parser.add_argument("--lr-monitor", action="store_true")
args = parser.parse_args()


class Net(pl.LightningModule):
    def __init__(self):
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
        self.log_dict(grad_norm(self, norm_type=2))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        norms = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.log("after_step/grad_norm", torch.linalg.vector_norm(torch.stack(norms)))

    def on_train_epoch_start(self):
        optimizer = self.trainer.optimizers[0]
        if hasattr(optimizer, "train"):
            optimizer.train()

    def configure_optimizers(self):
        if args.optimizer == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        else:
            optimizer = AdamWScheduleFree(self.parameters(), lr=1e-2)
        if not args.lr_monitor:
            return optimizer
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


torch.manual_seed(0)
x = torch.randn(64, 8)
y = (x[:, 0] > 0).long()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
trainer = pl.Trainer(
    max_epochs=2,
    logger=pl.loggers.TensorBoardLogger(args.logdir),
    log_every_n_steps=1,
    gradient_clip_val=args.clip,
    callbacks=[pl.callbacks.LearningRateMonitor("step")] if args.lr_monitor else [],
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
)
trainer.fit(Net(), loader)
