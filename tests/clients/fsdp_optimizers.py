"""sfdiag.optim's four classes, every path, on FSDP2 (2 ranks, gloo) against the same
optimizer in one process on the same global batch. Rank 0 prints one JSON line:
variant -> max over parameters of ||fsdp - single|| / ||single||.

    torchrun --nproc-per-node 2 --standalone fsdp_optimizers.py
"""

import json
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from sfdiag.optim import (
    AdamWScheduleFree,
    AdamWScheduleFreeReference,
    SGDScheduleFree,
    SGDScheduleFreeReference,
)

VARIANTS = {
    "sf-adamw foreach": (AdamWScheduleFree, {"foreach": True}),
    "sf-adamw loop": (AdamWScheduleFree, {"foreach": False}),
    "sf-ref": (AdamWScheduleFreeReference, {}),
    "sf-sgd foreach": (SGDScheduleFree, {"foreach": True}),
    "sf-sgd loop": (SGDScheduleFree, {"foreach": False}),
    "sf-sgd-ref": (SGDScheduleFreeReference, {}),
}


def build():
    torch.manual_seed(0)
    # 1024 x 640 = 655,360 elements: each rank's shard is past one CPU tile of the foreach path
    return torch.nn.Sequential(
        torch.nn.Linear(8, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 640),
        torch.nn.ReLU(),
        torch.nn.Linear(640, 3),
    )


def train(model, cls, kwargs, rank, world):
    optimizer = cls(model.parameters(), lr=1e-2, weight_decay=0.01, warmup_steps=2, **kwargs)
    optimizer.train()
    for step in range(4):
        optimizer.zero_grad()
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(step))
        share = 8 // world
        model(x[rank * share : (rank + 1) * share]).pow(2).mean().backward()
        optimizer.step()
    optimizer.eval()  # x, the weights to evaluate and save


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
errors = {}
for name, (cls, kwargs) in VARIANTS.items():
    single = build()
    train(single, cls, kwargs, 0, 1)
    sharded = build()
    fully_shard(sharded)
    train(sharded, cls, kwargs, rank, world)
    worst = 0.0
    for p, q in zip(sharded.state_dict().values(), single.state_dict().values(), strict=True):
        full = p.full_tensor()
        worst = max(worst, float((full - q).norm() / q.norm()))
    errors[name] = worst
if rank == 0:
    print(json.dumps(errors), flush=True)
dist.barrier()
dist.destroy_process_group()
# rank 0 aborted twice in ~160 runs here after printing ("terminate called without an active
# exception"): torch's gloo threads at the interpreter's finalization (torch's issues 190489,
# 179291). The results are out: leave without finalizing
os._exit(0)
