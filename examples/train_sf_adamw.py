"""A small training run with schedule-free AdamW, logging the grad norm two ways.

The memory-efficient schedule-free AdamW reuses ``p.grad`` as a work buffer: after
``optimizer.step()`` it holds the Adam-normalised update, not the gradient. A grad norm
read after ``step()`` (the WRONG way, and what many training loops do) comes out in the
hundreds; the real one, read before ``step()`` or by ``sfdiag.GradMonitor`` (the RIGHT
way), stays small.

    python examples/train_sf_adamw.py --steps 20
    sfdiag run --report run.json -- python examples/train_sf_adamw.py

``--exit-code N`` makes the script exit with N at the end (to try ``sfdiag run``'s
pass-through of exit codes).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import sfdiag
from sfdiag.optim import AdamWScheduleFree


def grad_norm(model: nn.Module) -> float:
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--lr", type=float, default=0.0025, help="learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exit-code", type=int, default=0, help="exit with this code at the end")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    # Synthetic classification: 10 classes, labels from a fixed random linear map.
    inputs = torch.randn(512, 64)
    labels = (inputs @ torch.randn(64, 10)).argmax(dim=1)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    optimizer = AdamWScheduleFree(model.parameters(), lr=args.lr)
    optimizer.train()  # schedule-free optimizers start in eval mode
    monitor = sfdiag.GradMonitor(optimizer)
    loss_fn = nn.CrossEntropyLoss()

    print(
        f"{'step':>4}  {'loss':>7}  {'before step (right)':>19}  {'monitor (right)':>15}  "
        f"{'after step (WRONG)':>18}"
    )
    for step in range(args.steps):
        batch = torch.randint(0, len(inputs), (64,))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs[batch]), labels[batch])
        loss.backward()
        right = grad_norm(model)  # the gradient, as backward() left it
        optimizer.step()
        wrong = grad_norm(model)  # p.grad now holds the optimizer's update
        print(
            f"{step:>4}  {loss.item():>7.4f}  {right:>19.4f}  {monitor.last_grad_norm:>15.4f}  "
            f"{wrong:>18.2f}"
        )

    optimizer.eval()  # evaluate at the averaged point
    with torch.no_grad():
        accuracy = (model(inputs).argmax(dim=1) == labels).float().mean().item()
    history = monitor.history
    right_mean = sum(pre for pre, _ in history) / len(history) if history else float("nan")
    wrong_mean = sum(post for _, post in history) / len(history) if history else float("nan")
    print(
        f"mean grad norm: right {right_mean:.4f}, wrong {wrong_mean:.2f}; accuracy {accuracy:.3f}"
    )
    monitor.remove()
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
