"""A plain training loop that logs its gradient norm to TensorBoard twice: right and wrong.

The loop logs ``train/grad_norm`` between ``backward()`` and ``optimizer.step()`` (the
gradient's norm) and ``train/grad_norm_after_step`` after ``step()``, where
schedule-free AdamW's memory-efficient form has turned ``p.grad`` into its update.
Both look plausible on a dashboard. ``sfdiag run`` says which one is the gradient's:

    sfdiag run --strict -- python examples/train_tensorboard.py --logdir runs/demo

``--optimizer adamw`` trains with torch's AdamW instead (both norms are then right),
``--device cuda`` trains on a GPU,
``--clip X`` clips the grads to norm X before ``step()`` and also logs what
``clip_grad_norm_`` returned, ``--log-every N`` logs every Nth step only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from sfdiag.optim import AdamWScheduleFree


def grad_norm(model: nn.Module) -> float:
    """The global L2 norm of ``p.grad``, as most training loops compute it."""
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=1, help="log every Nth step")
    parser.add_argument("--optimizer", choices=("sf-adamw", "adamw"), default="sf-adamw")
    parser.add_argument("--clip", type=float, default=None, help="clip_grad_norm_ to this")
    parser.add_argument("--logdir", default=None, help="TensorBoard log dir (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    inputs = torch.randn(512, 32)
    labels = (inputs @ torch.randn(32, 10)).argmax(dim=1)
    inputs, labels = inputs.to(args.device), labels.to(args.device)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10)).to(args.device)
    if args.optimizer == "sf-adamw":
        optimizer = AdamWScheduleFree(model.parameters(), lr=2e-3)
        optimizer.train()  # schedule-free optimizers start in eval mode
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()

    logdir = args.logdir or tempfile.mkdtemp(prefix="sfdiag-tb-")
    with SummaryWriter(logdir) as writer:
        for step in range(args.steps):
            batch = torch.randint(0, len(inputs), (64,)).to(args.device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs[batch]), labels[batch])
            loss.backward()
            logging = step % args.log_every == 0
            if args.clip is not None:
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                if logging:
                    writer.add_scalar("train/clip_total", total, step)
            if logging:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/grad_norm", grad_norm(model), step)  # right
            optimizer.step()
            if logging:
                writer.add_scalar("train/grad_norm_after_step", grad_norm(model), step)  # wrong
    print(f"trained {args.steps} steps; TensorBoard logs in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
