"""DistributedDataParallel with schedule-free AdamW on CPU (gloo): rank 0 logs the grad norm
to TensorBoard before step() (right: clip_grad_norm_'s return value) and after (wrong).

Run it as a job of two ranks, audited as one:

    sfdiag run --nproc 2 --report ddp.json -- python examples/train_ddp.py
    torchrun --nproc-per-node 2 -m sfdiag run --report ddp.json -- python examples/train_ddp.py

``--rescale-rank R`` makes rank R scale its grads after DDP's all-reduce (the ranks then
step different gradients), ``--fail-rank R --fail-step S`` makes rank R raise at step S.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from sfdiag.optim import AdamWScheduleFree


def grad_norm(model: nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--logdir", default=None, help="TensorBoard log dir (rank 0)")
    parser.add_argument("--rescale-rank", type=int, default=None)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-step", type=int, default=3)
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    inputs = torch.randn(256, 32)
    labels = (inputs @ torch.randn(32, 10)).argmax(dim=1)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)))
    optimizer = AdamWScheduleFree(model.parameters(), lr=2e-3)
    optimizer.train()
    writer = None
    if rank == 0:
        writer = SummaryWriter(args.logdir or tempfile.mkdtemp(prefix="sfdiag-ddp-"))

    generator = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        batch = torch.randint(0, len(inputs), (16 * world,), generator=generator)
        mine = batch[rank::world]  # each rank its share of the global batch
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs[mine]), labels[mine]).backward()
        if rank == args.rescale_rank:
            for p in model.parameters():
                p.grad.mul_(0.5)
        if rank == args.fail_rank and step == args.fail_step:
            raise RuntimeError(f"rank {rank} fails at step {step}")
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e6)
        if writer is not None:
            writer.add_scalar("train/grad_norm", total, step)  # right
        optimizer.step()
        if writer is not None:
            writer.add_scalar("train/grad_norm_after_step", grad_norm(model), step)  # wrong
    if writer is not None:
        writer.close()
    print(f"rank {rank}: trained {args.steps} steps")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
