"""Trains without any logger and reports which logging packages got imported."""

import json
import sys

import torch

model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(2):
    optimizer.zero_grad()
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
watched = ("wandb", "mlflow", "lightning", "pytorch_lightning", "transformers", "tensorboardX")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in watched)
loaded += [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]
print(json.dumps(loaded))
