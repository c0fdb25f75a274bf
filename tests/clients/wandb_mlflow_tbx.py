"""One loop, three loggers: W&B (offline), MLflow (local file store), tensorboardX.
Each logs a norm taken before step() (right) and one taken after (wrong); the scheduler's
rate is logged before scheduler.step() (right: W&B, tensorboardX) and after it, under the
step's own number (the next step's rate: MLflow).

    python wandb_mlflow_tbx.py DIR
"""

import os
import sys

import mlflow
import tensorboardX
import torch
import wandb

from sfdiag.optim import AdamWScheduleFree

root = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
optimizer = AdamWScheduleFree(model.parameters(), lr=1e-2)
optimizer.train()
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.8**step)


def norm():
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


run = wandb.init(project="sfdiag-test", dir=root, mode="offline")
mlflow.set_tracking_uri("file://" + os.path.join(root, "mlruns"))
mlflow.start_run()
writer = tensorboardX.SummaryWriter(os.path.join(root, "tbx"))
for step in range(8):
    optimizer.zero_grad()
    model(torch.randn(16, 8)).pow(2).mean().backward()
    before = norm()
    wandb.log({"train/grad_norm": before, "train/loss": 0.0}, commit=False)
    mlflow.log_metric("gnorm", before, step=step)
    writer.add_scalar("tbx/grad_norm", before, step)
    optimizer.step()
    after = norm()
    run.log({"after/grad_norm": after})
    mlflow.log_metrics({"after_gnorm": after, "loss": 1.0}, step=step)
    writer.add_scalars("tbx_after", {"grad_norm": after}, step)
    wandb.log({"train/lr": scheduler.get_last_lr()[0]})
    writer.add_scalar("tbx/lr", scheduler.get_last_lr()[0], global_step=step)
    scheduler.step()
    mlflow.log_metric("lr", scheduler.get_last_lr()[0], step=step)
writer.close()
mlflow.end_run()
run.finish()
