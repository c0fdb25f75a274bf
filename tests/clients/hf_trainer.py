"""Hugging Face Trainer on a tiny model: its logged grad_norm is clip_grad_norm_'s return
value, taken before step().

    python hf_trainer.py OUTDIR [OPTIM] [MAX_GRAD_NORM]
"""

import sys

import torch
from transformers import Trainer, TrainingArguments


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
        )

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


args = TrainingArguments(
    output_dir=sys.argv[1],
    optim=sys.argv[2] if len(sys.argv) > 2 else "schedule_free_adamw",
    max_grad_norm=float(sys.argv[3]) if len(sys.argv) > 3 else 1.0,
    max_steps=10,
    per_device_train_batch_size=8,
    learning_rate=1e-2,
    logging_steps=1,
    report_to=["tensorboard"],
    save_strategy="no",
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)
Trainer(model=Net(), args=args, train_dataset=Data()).train()
