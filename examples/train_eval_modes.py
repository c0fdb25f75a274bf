"""Schedule-free AdamW with evaluation and checkpoints, done wrong or as documented.

A schedule-free optimizer trains at ``y`` but its weights to evaluate and save are ``x``;
only ``optimizer.eval()`` puts ``x`` into the model. ``--wrong`` evaluates and saves with
the optimizer left in train mode (metrics and checkpoint of the wrong weights);
without it the script does what the release documents. ``--batchnorm`` adds a BatchNorm
layer, whose running statistics must be recomputed at ``x`` before evaluating
(``--refresh``, the release's recipe).

    sfdiag run --strict -- python examples/train_eval_modes.py --wrong
    sfdiag run --strict -- python examples/train_eval_modes.py --batchnorm --refresh
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch import nn

from sfdiag.optim import AdamWScheduleFree, AdamWScheduleFreeReference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--wrong", action="store_true", help="evaluate and save in train mode")
    parser.add_argument("--batchnorm", action="store_true", help="a model with BatchNorm")
    parser.add_argument("--refresh", action="store_true", help="recompute BatchNorm stats at x")
    parser.add_argument("--out", default=None, help="where the checkpoint goes")
    parser.add_argument(
        "--reference", action="store_true", help="the reference form (leaves p.grad alone)"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    inputs = torch.randn(512, 32)
    labels = (inputs @ torch.randn(32, 10)).argmax(dim=1)
    norm = [nn.BatchNorm1d(64)] if args.batchnorm else []
    model = nn.Sequential(nn.Linear(32, 64), *norm, nn.ReLU(), nn.Linear(64, 10))
    form = AdamWScheduleFreeReference if args.reference else AdamWScheduleFree
    optimizer = form(model.parameters(), lr=5e-3)
    loss_fn = nn.CrossEntropyLoss()

    def batches(count: int):
        for _ in range(count):
            index = torch.randint(0, len(inputs), (64,))
            yield inputs[index], labels[index]

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            accuracy = (model(inputs).argmax(dim=1) == labels).float().mean().item()
        model.train()
        return accuracy

    model.train()
    optimizer.train()
    for step, (x, y) in enumerate(batches(args.steps)):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        if (step + 1) % args.eval_every == 0:
            if not args.wrong:
                optimizer.eval()  # x into the model
                if args.refresh:  # BatchNorm statistics at x: training forwards, no grad
                    with torch.no_grad():
                        for bx, _ in batches(10):
                            model(bx)
            print(f"step {step + 1}: accuracy {evaluate():.3f}")
            if not args.wrong:
                optimizer.train()  # back to y

    if not args.wrong:
        optimizer.eval()
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="sfdiag-ckpt-"), "model.pt")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
