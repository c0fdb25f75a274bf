"""A mixed-precision loop with gradient accumulation, logging its gradient norm and rate
every way people get them wrong (TensorBoard).

``torch.autocast("cpu")`` (bfloat16, or float16 with ``--dtype float16``), a
``torch.amp.GradScaler("cpu", init_scale=1024)``, 4 micro-batches a step (each loss / 4),
``clip_grad_norm_`` after ``scaler.unscale_``, AdamW over two param groups (rates 1e-3 and
5e-4), ``zero_grad(set_to_none=False)`` at the end of each step. Logged at every step
(the step's index as ``global_step``):

    micro/grad_norm      ||p.grad|| after each micro-batch's backward: the grads summed
                         so far, still scaled (4 values a step)   -> partial-accumulation
    scaled/grad_norm     ||p.grad|| after the last backward, before unscale_:
                         the scale (1024) times the gradient's norm -> loss-scaled
    grad_norm            clip_grad_norm_'s return, after unscale_ -> correct
    prev/grad_norm       the step before's clip_grad_norm_ return, logged after this
                         step (from the second step on)              -> previous-step
    zeroed/grad_norm     ||p.grad|| after zero_grad(set_to_none=False): 0 -> zeroed
    lr                   group 1's rate (the name says group 0)      -> other-group
    lr/group1            group 1's rate                              -> correct
    swapped/lr/group1    group 0's rate (the name says group 1)      -> other-group

    python amp_loop.py LOGDIR [--steps N] [--dtype bfloat16|float16] [--overflow-at K]
                              [--scheduler] [--log NAME,NAME...]

``--overflow-at K`` multiplies step K's last micro-batch loss by inf: its grads are
non-finite, ``scaler.step`` skips ``optimizer.step()`` and ``scaler.update()`` halves the
scale (1024 -> 512); the values logged at step K are inf or NaN (``grad_norm``: NaN).
``--scheduler`` steps a LambdaLR (0.9 ** k) after every ``scaler.step``, skipped or not.
``--log`` logs only the names given. At the end the script writes LOGDIR/norms.json:
per step, clip_grad_norm_'s return, the scale in force, whether the step was skipped.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

MICRO = 4
NAMES = (
    "micro/grad_norm",
    "scaled/grad_norm",
    "grad_norm",
    "prev/grad_norm",
    "zeroed/grad_norm",
    "lr",
    "lr/group1",
    "swapped/lr/group1",
)

parser = argparse.ArgumentParser()
parser.add_argument("logdir")
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
parser.add_argument("--overflow-at", type=int, default=None)
parser.add_argument("--scheduler", action="store_true")
parser.add_argument("--log", default=",".join(NAMES))
args = parser.parse_args()
logged = set(args.log.split(","))
assert logged <= set(NAMES), logged - set(NAMES)


def global_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


torch.manual_seed(0)
data = torch.Generator().manual_seed(1)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
optimizer = torch.optim.AdamW(
    [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 5e-4},
    ],
    lr=1e-3,
)
scaler = torch.amp.GradScaler("cpu", init_scale=1024)
scheduler = (
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.9**k) if args.scheduler else None
)
dtype = getattr(torch, args.dtype)
record = {"clip": [], "scale": [], "skipped": []}

with SummaryWriter(args.logdir) as writer:

    def log(name: str, value, step: int) -> None:
        if name in logged:
            writer.add_scalar(name, value, step)

    previous = None
    for step in range(args.steps):
        scale = scaler.get_scale()
        for micro in range(MICRO):
            x = torch.randn(8, 4, generator=data)
            with torch.autocast("cpu", dtype=dtype):
                out = model(x)
            loss = out.float().pow(2).mean() / MICRO
            if step == args.overflow_at and micro == MICRO - 1:
                loss = loss * math.inf
            scaler.scale(loss).backward()
            log("micro/grad_norm", global_norm(model), step)
        log("scaled/grad_norm", global_norm(model), step)
        scaler.unscale_(optimizer)
        clip = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=100.0)
        log("grad_norm", clip, step)
        log("lr", optimizer.param_groups[1]["lr"], step)
        log("lr/group1", optimizer.param_groups[1]["lr"], step)
        log("swapped/lr/group1", optimizer.param_groups[0]["lr"], step)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if previous is not None:
            log("prev/grad_norm", previous, step)
        previous = float(clip)
        optimizer.zero_grad(set_to_none=False)
        log("zeroed/grad_norm", global_norm(model), step)
        record["clip"].append(float(clip))
        record["scale"].append(scale)
        record["skipped"].append(scaler.get_scale() < scale)

(Path(args.logdir) / "norms.json").write_text(json.dumps(record))
print(f"trained {args.steps} steps ({sum(record['skipped'])} skipped); logs in {args.logdir}")
