"""Hugging Face Trainer on a tiny model: its logged grad_norm is clip_grad_norm_'s return
value, taken before step(); its logged learning_rate is the scheduler's rate, read before
the scheduler steps (right, unless the optimizer warms up on its own). With
``--grad-accum N`` (gradient_accumulation_steps) each step sums N micro-batches of 8 and
the logged grad_norm is still the summed gradient's (clipped after the last backward).

    sfdiag run -- python examples/train_hf_trainer.py OUTDIR [--optim NAME]
        [--max-grad-norm X] [--warmup-steps N] [--scheduler linear|constant] [--lr X]
        [--grad-accum N]

Needs transformers, accelerate and schedulefree (pip install -e '.[test]').
"""

import argparse

import torch
from transformers import Trainer, TrainingArguments

parser = argparse.ArgumentParser()
parser.add_argument("outdir")
parser.add_argument("--optim", default="schedule_free_adamw")
parser.add_argument("--max-grad-norm", type=float, default=1.0)
parser.add_argument("--warmup-steps", type=int, default=0)
parser.add_argument("--scheduler", default="linear")
parser.add_argument("--lr", type=float, default=1e-2)
parser.add_argument("--grad-accum", type=int, default=1)
options = parser.parse_args()


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
    output_dir=options.outdir,
    optim=options.optim,
    max_grad_norm=options.max_grad_norm,
    warmup_steps=options.warmup_steps,
    lr_scheduler_type=options.scheduler,
    max_steps=10,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=options.grad_accum,
    learning_rate=options.lr,
    logging_steps=1,
    report_to=["tensorboard"],
    save_strategy="no",
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)
torch.manual_seed(0)  # the model's initial weights: Trainer's seed=0 seeds only what follows it
Trainer(model=Net(), args=args, train_dataset=Data()).train()
