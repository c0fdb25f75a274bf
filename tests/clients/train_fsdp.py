"""FSDP2 (fully_shard, DTensor grads) with torch AdamW on CPU (gloo). Rank 0 logs the
global grad norm clip_grad_norm_ returns (right) and the norm of its own local shards
(wrong: the local-shard bug of FSDP training scripts).

    sfdiag run --nproc 2 -- python train_fsdp.py LOGDIR
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.utils.tensorboard import SummaryWriter

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
for layer in model:
    if isinstance(layer, torch.nn.Linear):
        fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
writer = SummaryWriter(os.path.join(sys.argv[1], "fsdp")) if rank == 0 else None
for step in range(5):
    optimizer.zero_grad()
    generator = torch.Generator().manual_seed(step * 100 + rank)
    model(torch.randn(4, 8, generator=generator)).pow(2).mean().backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    shards = [p.grad.to_local().norm() for p in model.parameters()]
    if writer is not None:
        writer.add_scalar("train/grad_norm", total.full_tensor(), step)
        writer.add_scalar("grad_norm_local", torch.linalg.vector_norm(torch.stack(shards)), step)
    optimizer.step()
if writer is not None:
    writer.close()
dist.barrier()
dist.destroy_process_group()
