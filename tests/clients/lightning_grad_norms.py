"""Lightning: grad_norm(self) logged in on_before_optimizer_step (right) and a norm logged
in on_train_batch_end, after step() (wrong with schedule-free AdamW). With --lr-monitor,
a per-step decaying schedule and LearningRateMonitor logging its rate (right). With
--accumulate N (Trainer(accumulate_grad_batches=N)), a norm logged in on_after_backward too:
after the first N - 1 micro-batches of a step it is the norm of the grads summed so far
(wrong: partial-accumulation), after the last the gradient's; on_train_batch_end alike, as
its first N - 1 micro-batches end before step() (with adamw, which leaves p.grad alone,
the last one reads the gradient's).

    python lightning_grad_norms.py LOGDIR [--clip X] [--optimizer sf-adamw|adamw]
                                          [--lr-monitor] [--accumulate N]
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
parser.add_argument("--accumulate", type=int, default=1)
args = parser.parse_args()


def global_norm(module):
    norms = [p.grad.norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


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

    def on_after_backward(self):
        if args.accumulate > 1:
            self.log("after_backward/grad_norm", global_norm(self))

    def on_before_optimizer_step(self, optimizer):
        self.log_dict(grad_norm(self, norm_type=2))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log("after_step/grad_norm", global_norm(self))

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
    accumulate_grad_batches=args.accumulate,
    callbacks=[pl.callbacks.LearningRateMonitor("step")] if args.lr_monitor else [],
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
)
trainer.fit(Net(), loader)
