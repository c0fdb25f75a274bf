"""The training loop of nanoGPT's train.py, in its shape (a tiny model, made-up tokens):
the rate is set at the top of each iteration for the step about to run, and logged at eval
time with ``wandb.log({"iter": iter_num, ..., "lr": lr})``; gradient accumulation, a
GradScaler (disabled, as on the CPU), clipping, ``zero_grad(set_to_none=True)``. No
scheduler. It also logs the rate under a name of its own without the step key.

    python nanogpt_loop.py DIR
"""

import math
import sys

import torch
import wandb

out_dir = sys.argv[1]
learning_rate, min_lr, warmup_iters, lr_decay_iters, max_iters = 6e-4, 6e-5, 4, 20, 24
eval_interval, gradient_accumulation_steps, grad_clip = 4, 2, 1.0
torch.manual_seed(1337)
model = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32))
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95))
scaler = torch.amp.GradScaler("cpu", enabled=False)


def get_batch():
    x = torch.randint(0, 32, (4, 8))
    return x, torch.roll(x, 1, dims=1)


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def loss_of(x, y):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.view(-1, 32), y.view(-1))


wandb.init(project="nanogpt-shape", dir=out_dir, mode="offline")
iter_num = 0
X, Y = get_batch()
while True:
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    if iter_num % eval_interval == 0:
        with torch.no_grad():
            val = float(loss_of(*get_batch()))
        print(f"step {iter_num}: val loss {val:.4f}")
        wandb.log({"iter": iter_num, "train/loss": val, "val/loss": val, "lr": lr, "mfu": 0.0})
        wandb.log({"train/lr": lr})
    for _micro_step in range(gradient_accumulation_steps):
        loss = loss_of(X, Y) / gradient_accumulation_steps
        X, Y = get_batch()
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    if iter_num > max_iters:
        break
