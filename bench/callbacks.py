"""The Lightning callback's cost against ``sfdiag.audit()`` around the same training.

    python bench/callbacks.py [--quick] [--steps N] [--rounds N] [--threads N]

prints one JSON object (``measure_callback_overhead``'s). Each run builds a fresh
``LightningModule`` (a 2-layer MLP, schedule-free AdamW, its grad norm logged with
``self.log`` in ``on_before_optimizer_step``, so the taps and the metric audit work as in
a real run) and a fresh ``Trainer(max_steps=steps, logger=False)`` on the CPU, and times
``trainer.fit`` in one of four ways:

- ``callback``: ``Trainer(callbacks=[SfdiagCallback(show=False)])``;
- ``audit``: ``with sfdiag.audit(show=False): trainer.fit(...)``;
- ``plain``: neither (for scale);
- ``noop``: a ``Callback`` that does nothing (what Lightning's hook dispatch costs any
  callback: ``noop_callback_vs_plain_ratio``).

The four are shuffled every round (seeded), after one untimed warm-up run of each, and
the medians compared, in the process's CPU time (``time.process_time``: others' jobs on a
shared machine move wall time far more; the wall-time figures are reported beside, as
``*_wall``): ``callback_vs_audit_ratio`` (the headline, goal about 1.0: the callback runs
the same audit; what it adds is a step count check per batch, the logging at the end
(no logger here) and Lightning's dispatch of about six hooks a batch to one more callback,
about 1-2 % of this tiny model's 1-2 ms steps, as ``noop`` shows), ``audit_vs_plain_ratio``
and ``callback_vs_plain_ratio``, with ``callback_vs_audit_paired`` (the median of the
per-round ratios, blind to slow drifts in load). torch runs on ``threads`` threads (1 by default).

``bench/run.py`` reports ``callback_vs_audit_ratio`` among its figures (``callback_figures``:
``callback_steps`` and ``callback_rounds`` of its ``Settings``, the details as
``callback_overhead``); skipped where Lightning is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any


def _lightning() -> Any:
    try:
        import lightning.pytorch as pl
    except ImportError:  # pragma: no cover
        import pytorch_lightning as pl
    return pl


def _module_class(pl: Any) -> Any:
    import torch

    from sfdiag.optim import AdamWScheduleFree

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
            )

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            norms = [p.grad.norm() for p in self.parameters() if p.grad is not None]
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(norms)))

        def on_train_epoch_start(self) -> None:
            self.trainer.optimizers[0].train()

        def configure_optimizers(self) -> Any:
            return AdamWScheduleFree(self.parameters(), lr=1e-2)

    return Net


def measure_callback_overhead(
    steps: int = 200, rounds: int = 9, threads: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Seconds of ``trainer.fit`` (``steps`` optimizer steps) with the callback, inside
    ``sfdiag.audit()`` and with neither, interleaved over ``rounds`` rounds (see the module
    doc); returns the medians and their ratios."""
    import torch

    import sfdiag
    from sfdiag.integrations.lightning import SfdiagCallback

    pl = _lightning()
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # its banners, on stdout
    Net = _module_class(pl)
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=generator)
    y = (x[:, 0] > 0).long()
    data = torch.utils.data.TensorDataset(x, y)

    def fit(callbacks: list[Any], around: Callable[[], Any] | None = None) -> tuple[float, float]:
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        trainer = pl.Trainer(
            max_steps=steps,
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
            log_every_n_steps=1,
        )
        model = Net()
        gc.collect()  # the previous runs' garbage is collected outside the timing
        cpu, wall = time.process_time(), time.perf_counter()
        if around is None:
            trainer.fit(model, loader)
        else:
            with around():
                trainer.fit(model, loader)
        return time.process_time() - cpu, time.perf_counter() - wall

    runs: dict[str, Callable[[], tuple[float, float]]] = {
        "callback": lambda: fit([SfdiagCallback(show=False)]),
        "audit": lambda: fit([], lambda: sfdiag.audit(show=False)),
        "plain": lambda: fit([]),
        "noop": lambda: fit([pl.Callback()]),  # what any callback costs Lightning's dispatch
    }
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    rng = random.Random(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers, sfdiag's early warning
        for run in runs.values():  # warm-up: imports, first-call costs
            run()
        for _ in range(rounds):
            for name in rng.sample(list(runs), len(runs)):
                seconds, elapsed = runs[name]()
                cpu[name].append(seconds)
                wall[name].append(elapsed)

    def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
        return round(statistics.median(times[num]) / statistics.median(times[den]), 4)

    pairs = zip(cpu["callback"], cpu["audit"], strict=True)
    return {
        "callback_vs_audit_ratio": ratio(cpu, "callback", "audit"),
        "callback_vs_audit_paired": round(statistics.median(a / b for a, b in pairs), 4),
        "audit_vs_plain_ratio": ratio(cpu, "audit", "plain"),
        "callback_vs_plain_ratio": ratio(cpu, "callback", "plain"),
        "noop_callback_vs_plain_ratio": ratio(cpu, "noop", "plain"),
        "callback_vs_audit_ratio_wall": ratio(wall, "callback", "audit"),
        "audit_vs_plain_ratio_wall": ratio(wall, "audit", "plain"),
        "seconds_cpu": {name: round(statistics.median(v), 4) for name, v in cpu.items()},
        "seconds_wall": {name: round(statistics.median(v), 4) for name, v in wall.items()},
        "steps": steps,
        "rounds": rounds,
        "threads": threads,
        "lightning_version": pl.__version__,
        "torch_version": torch.__version__,
    }


def lightning_installed() -> bool:
    """Whether ``lightning`` (or the older ``pytorch_lightning``) can be imported here."""
    return any(importlib.util.find_spec(name) for name in ("lightning", "pytorch_lightning"))


def callback_figures(steps: int, rounds: int, threads: int, notes: list[str]) -> dict[str, Any]:
    """``bench/run.py``'s ``callback_vs_audit_ratio`` and its details (``callback_overhead``):
    ``measure_callback_overhead``; None for both, with a note, without Lightning."""
    if not lightning_installed():
        notes.append("lightning is not installed: callback_vs_audit_ratio is skipped")
        return {"callback_vs_audit_ratio": None, "callback_overhead": None}
    with contextlib.redirect_stdout(sys.stderr):  # whatever Lightning prints: not in --json's
        figure = measure_callback_overhead(steps=steps, rounds=rounds, threads=threads)
    return {
        "callback_vs_audit_ratio": figure["callback_vs_audit_ratio"],
        "callback_overhead": figure,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 steps, 3 rounds")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    steps = args.steps or (100 if args.quick else 200)
    rounds = args.rounds or (3 if args.quick else 9)
    figures = measure_callback_overhead(steps=steps, rounds=rounds, threads=args.threads)
    json.dump(figures, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
