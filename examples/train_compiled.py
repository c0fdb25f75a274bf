"""A training loop whose optimizer step is compiled, as torch's tutorial compiles it.

The step is ``torch.compile(fullgraph=False)`` around ``optimizer.step()`` (AdamW with
a tensor learning rate, so a changed rate needs no recompile), and ``--compile-model``
compiles the model too. The loop logs ``grad_norm`` between ``backward()`` and the step
(the norm ``clip_grad_norm_`` returns, with a max_norm that never clips) and
``post/grad_norm`` after it, where schedule-free AdamW has turned ``p.grad`` into its
update. Each step's loss is printed in full precision: ``sfdiag run`` must leave it
exactly as it is.

    sfdiag run -- python examples/train_compiled.py --optimizer sf-adamw --compile-model

``--optimizer schedulefree`` trains with the public ``schedulefree`` release's
AdamWScheduleFree, ``--monitor`` logs ``sfdiag.GradMonitor(optimizer).last_grad_norm`` as
``monitor/grad_norm`` too, ``--eager-step`` leaves the step uncompiled, ``--fullgraph``
compiles it as one graph (schedule-free optimizers only: torch's own break the graph in
``step()``; and 8 steps at most: their step count is a Python int that dynamo guards on,
so each step recompiles, and fullgraph fails at the recompile limit, with or without
sfdiag; sfdiag cannot audit those steps, and says so), ``--backend`` picks
torch.compile's backend (``inductor``, as users run it, or ``aot_eager``, which compiles
no C++).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter


def grad_norm(model: nn.Module) -> float:
    """The global L2 norm of ``p.grad``, as most training loops compute it."""
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def make_optimizer(kind: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=torch.tensor(0.01))
    if kind == "sf-adamw":
        from sfdiag.optim import AdamWScheduleFree
    else:
        from schedulefree import AdamWScheduleFree
    optimizer = AdamWScheduleFree(params, lr=0.01)
    optimizer.train()  # schedule-free optimizers start in eval mode
    return optimizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--optimizer", choices=("adamw", "sf-adamw", "schedulefree"), default="adamw"
    )
    parser.add_argument("--compile-model", action="store_true", help="torch.compile the model too")
    parser.add_argument(
        "--eager-step", action="store_true", help="leave optimizer.step() uncompiled"
    )
    parser.add_argument("--monitor", action="store_true", help="log GradMonitor's norm too")
    parser.add_argument("--fullgraph", action="store_true", help="compile the step as one graph")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--logdir", default=None, help="TensorBoard log dir (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    inputs = torch.randn(64, 8)
    targets = inputs @ torch.randn(8, 1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = make_optimizer(args.optimizer, list(model.parameters()))
    if args.compile_model:
        model = torch.compile(model, backend=args.backend)
    monitor = None
    if args.monitor:
        from sfdiag import GradMonitor

        monitor = GradMonitor(optimizer)

    def optimizer_step() -> None:
        optimizer.step()

    if not args.eager_step:
        optimizer_step = torch.compile(
            optimizer_step, fullgraph=args.fullgraph, backend=args.backend
        )

    logdir = args.logdir or tempfile.mkdtemp(prefix="sfdiag-compiled-")
    with SummaryWriter(logdir) as writer:
        for step in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            # max_norm far above any norm here: it never clips, it returns the norm
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
            writer.add_scalar("grad_norm", total, step)  # right: read before step()
            optimizer_step()
            writer.add_scalar("post/grad_norm", grad_norm(model), step)  # read after step()
            if monitor is not None:
                writer.add_scalar("monitor/grad_norm", monitor.last_grad_norm, step)
            print(f"step {step} loss {loss.item()!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
