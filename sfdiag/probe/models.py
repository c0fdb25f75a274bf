"""The built-in models. Each factory returns a fresh ``nn.Module``.

A model may declare ``sfdiag_input_shape`` (one sample's shape) and
``sfdiag_loss`` so that ``data: auto`` and ``loss: auto`` know what to feed it;
models without them are inspected (see ``sfdiag.probe.data.infer_input_shape``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.sfdiag_input_shape = (in_features,)
        self.sfdiag_loss = "cross_entropy"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class MnistCNN(nn.Module):
    """The network of the public PyTorch MNIST example (1,199,882 parameters)."""

    def __init__(self, dropout1: float = 0.25, dropout2: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(dropout1)
        self.dropout2 = nn.Dropout(dropout2)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)
        self.sfdiag_input_shape = (1, 28, 28)
        self.sfdiag_loss = "nll"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def mlp(in_features: int = 64, hidden: int = 128, num_classes: int = 10) -> nn.Module:
    return MLP(in_features, hidden, num_classes)


def mnist_cnn(dropout1: float = 0.25, dropout2: float = 0.5) -> nn.Module:
    return MnistCNN(dropout1, dropout2)
