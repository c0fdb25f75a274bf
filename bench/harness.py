"""What every figure of ``bench/run.py`` shares: ``Settings``, the interleaved timing and its
medians and ratios, the models and trainers the figures time, the workers (``bench/run.py
--worker ...`` in a fresh process with glibc malloc pinned), the machine's description, and
the headline figures (``FIGURES``, in the table's order) with their ``TARGETS``.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start/stop lines on stderr

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from sfdiag.step_audit.auditor import StepAuditor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENTRY = Path(__file__).resolve().with_name("run.py")  # what workers run: --worker KIND ...


# ----------------------------------------------------------------------------- figures, settings


#: glibc malloc with a fixed mmap threshold and no trimming: freed multi-MB temporaries are
#: reused, instead of going back to the OS and being faulted in again (zeroed) at the next
#: step. Which of them glibc returns depends on the process's allocation history, so page
#: faults come and go between otherwise identical steps. Workers run with this.
PINNED_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736"


#: the headline figures' targets (``met`` in the JSON)
TARGETS = {
    "audit_overhead_ratio": ("<=", 1.10),
    "audit_extra_memory_fraction": ("<=", 0.01),
    "sf_adamw_step_vs_upstream": ("<=", 1.0),
    "metric_audit_overhead_ratio": ("<=", 1.03),
    "audit_overhead_ratio_100m": ("<=", 1.08),
    "audit_extra_memory_fraction_mutating": ("<=", 0.01),
    "run_overhead_ratio_long": ("<=", 1.02),
    "ddp_audit_overhead_ratio": ("<=", 1.10),
    "mode_watch_overhead_ratio": ("<=", 1.01),
    "callback_vs_audit_ratio": ("<=", 1.05),
    "metric_at_log_fraction": ("<=", 0.01),
    "audit_host_us_per_tensor": ("<=", 5.0),
    "audit_host_us_per_tensor_mutating": ("<=", 5.0),
    "run_step_host_us_per_tensor": ("<=", 1.0),
    "run_host_us_per_logged_value": ("<=", 10.0),
    "sf_adamw_step_host_vs_upstream": ("<=", 1.0),
    "cli_help_seconds": ("<", 0.5),
    "compare_default_seconds": ("<", 5.0),
}


#: the headline figures, in the table's order (``render``)
FIGURES = (
    "audit_overhead_ratio",
    "audit_overhead_ratio_100m",
    "audit_extra_memory_fraction",
    "audit_extra_memory_fraction_mutating",
    "sf_adamw_step_vs_upstream",
    "sf_sgd_step_vs_upstream",
    "sf_adamw_step_vs_floor",
    "sf_adamw_compiled_step_vs_upstream",
    "sf_adamw_compiled_step_vs_floor",
    "sf_sgd_step_vs_floor",
    "metric_audit_overhead_ratio",
    "metric_at_log_fraction",
    "run_overhead_ratio_long",
    "ddp_audit_overhead_ratio",
    "mode_watch_overhead_ratio",
    "callback_vs_audit_ratio",
    "audit_host_us_per_tensor",
    "audit_host_us_per_tensor_mutating",
    "run_step_host_us_per_tensor",
    "run_host_us_per_logged_value",
    "sf_adamw_step_host_vs_upstream",
    "cli_help_seconds",
    "compare_default_seconds",
)


def meets(key: str, value: float | None) -> bool | None:
    """Whether ``value`` meets ``key``'s target; None where it was not measured."""
    if value is None:
        return None
    op, target = TARGETS[key]
    return value <= target if op == "<=" else value < target


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions; ``quick_mode()`` and ``tiny()`` (for tests) shrink them."""

    threads: int = 1
    model: str = "mnist-cnn"
    batch: int = 64
    overhead_pairs: int = 60
    sf_numel: int = 25_000_000
    sf_tensors: int = 20
    sf_rounds: int = 15
    copy_numel: int = 1 << 26  # 256 MiB of float32, far beyond any cache
    cli_runs: int = 7
    compare_runs: int = 3
    compare_one_thread: bool = True  # also time compare with OMP_NUM_THREADS=1
    pinned_malloc_steps: bool = True  # also the step comparisons with glibc malloc pinned
    scaling_sizes: tuple[int, ...] = (1_000_000, 10_000_000, 100_000_000)
    scaling_width: int = 1024
    scaling_batch: int = 8
    scaling_pairs: int = 8
    m100_size: int = 100_000_000  # audit_overhead_ratio_100m
    m100_pairs: int = 20
    long_steps: int = 2000  # run_overhead_ratio_long: steps a side ...
    long_chunk: int = 5  # ... in alternating chunks of this many
    # the host's cost per tensor: Linear(host_width, host_width) x host_layers (2 tensors each)
    host_layers: int = 1000
    host_width: int = 16
    host_pairs: int = 30  # audit_host_us_per_tensor*: interleaved pairs of steps
    host_rounds: int = 30  # run_step_host_us_per_tensor: rounds a side ...
    host_round_steps: int = 5  # ... of this many unaudited steps
    host_step_rounds: int = 40  # sf_adamw_step_host_vs_upstream
    value_rounds: int = 80  # run_host_us_per_logged_value: rounds of each of four sides ...
    value_round_steps: int = 20  # ... of this many steps
    logged_values: int = 8  # a step: half grad norms, half learning rates
    callback_steps: int = 200  # callback_vs_audit_ratio: trainer.fit's optimizer steps ...
    callback_rounds: int = 9  # ... in shuffled rounds of its four ways (bench/callbacks.py)
    quick: bool = False

    @classmethod
    def quick_mode(cls, **kw: Any) -> Settings:
        return replace(
            cls(),
            overhead_pairs=20,
            sf_rounds=5,
            cli_runs=5,
            compare_runs=2,
            scaling_sizes=(1_000_000, 10_000_000),
            scaling_pairs=8,
            long_steps=800,
            host_pairs=30,  # (as many as a full run: two quick runs must agree on these)
            host_rounds=30,
            host_step_rounds=20,
            value_rounds=40,
            callback_steps=100,
            callback_rounds=3,
            pinned_malloc_steps=False,
            quick=True,
            **kw,
        )

    @classmethod
    def tiny(cls, **kw: Any) -> Settings:
        """Seconds, not minutes: every code path, meaningless numbers (tests)."""
        return replace(
            cls(),
            model="mlp",
            batch=8,
            overhead_pairs=2,
            sf_numel=30_000,
            sf_tensors=3,
            sf_rounds=1,
            copy_numel=1 << 16,
            cli_runs=1,
            compare_runs=1,
            compare_one_thread=False,
            scaling_sizes=(20_000,),
            scaling_width=64,
            scaling_pairs=1,
            m100_size=20_000,
            m100_pairs=1,
            long_steps=20,
            long_chunk=10,
            host_layers=10,
            host_pairs=1,
            host_rounds=2,
            host_round_steps=2,
            host_step_rounds=1,
            value_rounds=3,
            value_round_steps=5,
            scaling_batch=2,
            callback_steps=4,
            callback_rounds=1,
            quick=True,
            **kw,
        )

    def to_json(self) -> str:
        """What a worker's ``--settings`` carries (``from_json`` reads it back)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))


# ----------------------------------------------------------------------------- timing


def interleaved(
    runs: dict[str, Callable[[], float]], rounds: int, *, warmup: int = 1, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per run of each callable (each returns its own timed seconds), interleaved.

    Two callables alternate A B / B A; more are shuffled each round (seeded).
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    names = list(runs)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        if len(names) == 2:
            order = names if i % 2 == 0 else names[::-1]
        else:
            order = rng.sample(names, len(names))
        for name in order:
            times[name].append(runs[name]())
    return times


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 3)


def median_ratio(num: list[float], den: list[float]) -> float:
    """The ratio of the medians (the headline figures)."""
    return round(statistics.median(num) / statistics.median(den), 4)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """The median of the per-round ratios: a cross-check that is blind to slow drifts in load."""
    return round(statistics.median(a / b for a, b in zip(num, den, strict=True)), 4)


def spread(ratios: list[float]) -> dict[str, float]:
    ordered = sorted(ratios)
    return {
        "min": round(ordered[0], 4),
        "median": round(statistics.median(ordered), 4),
        "max": round(ordered[-1], 4),
    }


# ----------------------------------------------------------------------------- models and trainers


def stacked_linear(params: int, width: int = 1024) -> torch.nn.Module:
    """Linear(width, width) layers, ReLU between, as many as make about ``params`` parameters.

    A fixed width keeps every tensor the same size, so the number of tensors (the auditor's
    fixed cost per tensor) grows with the parameters as the per-element work does, and no
    tensor is so large that glibc serves it by mmap (a page fault per page at every step).
    He-initialised, so that activations and grads keep their scale through the depth
    (vanishing values would turn into subnormal floats and slow everything down).
    """
    depth = max(1, round(params / (width * width + width)))
    layers: list[torch.nn.Module] = []
    for i in range(depth):
        layer = torch.nn.Linear(width, width)
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        torch.nn.init.zeros_(layer.bias)
        layers.append(layer)
        if i < depth - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    model.sfdiag_input_shape = (width,)
    model.sfdiag_loss = "mse"
    return model


def build_model(name: str) -> torch.nn.Module:
    from sfdiag.probe import models

    return {"mnist-cnn": models.mnist_cnn, "mlp": models.mlp}[name]()


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params)
    if name == "sf-adamw":
        from sfdiag.optim import AdamWScheduleFree

        opt = AdamWScheduleFree(params)
        opt.train()
        return opt
    raise ValueError(f"unknown optimizer {name!r}")


def sync(device: Any) -> None:
    """Wait for the device, so that a timer around queued work measures the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Trainer:
    """One model, one optimizer, one fixed batch: ``step()`` times a training step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    target: torch.Tensor
    loss: str
    device: str = "cpu"

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        optimizer: str,
        batch: int,
        seed: int = 0,
        device: str = "cpu",
    ) -> Trainer:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((batch, *model.sfdiag_input_shape), generator=gen)
        model.train()
        if model.sfdiag_loss == "mse":
            target = torch.zeros(batch, model(x[:1]).shape[1])
        else:
            target = torch.randint(0, 10, (batch,), generator=gen)
        model.to(device)
        return cls(
            model,
            make_optimizer(optimizer, model.parameters()),
            x.to(device),
            target.to(device),
            model.sfdiag_loss,
            device,
        )

    def auditor(self) -> StepAuditor:
        return StepAuditor(names={id(p): n for n, p in self.model.named_parameters()})

    def _loss(self) -> torch.Tensor:
        out = self.model(self.x)
        if self.loss == "mse":
            return F.mse_loss(out, self.target)
        if self.loss == "nll":
            return F.nll_loss(out, self.target)
        return F.cross_entropy(out, self.target)

    def step(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self._loss().backward()
        self.optimizer.step()
        sync(self.device)
        return time.perf_counter() - start

    def audited_step(self, auditor: StepAuditor) -> float:
        auditor.attach(self.optimizer)
        try:
            return self.step()
        finally:
            auditor.detach()
            auditor.observations.clear()

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


# ----------------------------------------------------------------------------- tiny tensors


def tiny_tensors(layers: int, width: int, seed: int = 0) -> torch.nn.Module:
    """``layers`` Linear(width, width): 2 x ``layers`` tensors of a few hundred elements, on
    which a step's time is the host's fixed cost per tensor (Python, small torch ops)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def tiny_grads(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Fixed grads as real ones look (randn x 1e-3, seeded), so that a mutated grad's
    fingerprint is fitted as in a real run."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).mul_(1e-3) for p in params]


class HostStep:
    """One optimizer over ``tiny_tensors``; the grads are filled once and copied back,
    untimed, before every step (sf-adamw overwrites them): every step sees the same grads."""

    def __init__(self, optimizer: str, layers: int, width: int, seed: int = 0) -> None:
        self.model = tiny_tensors(layers, width, seed)
        self.params = list(self.model.parameters())
        self.source = tiny_grads(self.params, seed + 1)
        for p, g in zip(self.params, self.source, strict=True):
            p.grad = g.clone()
        self.optimizer = make_optimizer(optimizer, self.params)

    @property
    def tensors(self) -> int:
        return len(self.params)

    def reset(self) -> None:
        torch._foreach_copy_([p.grad for p in self.params], self.source)

    def step(self) -> float:
        self.reset()
        start = time.perf_counter()
        self.optimizer.step()
        return time.perf_counter() - start


# ----------------------------------------------------------------------------- the release


def schedulefree_release() -> Any | None:
    try:
        import schedulefree
    except ImportError:
        return None
    return schedulefree


def schedulefree_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("schedulefree")
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- workers


def worker_args(settings: Settings, *args: str) -> list[str]:
    """``bench/run.py --worker ARGS --settings JSON``: the entry point's arguments for a
    worker (``run.py``'s ``worker()`` runs it), after the interpreter or torchrun."""
    return [str(ENTRY), "--worker", *args, "--settings", settings.to_json()]


def run_worker(settings: Settings, *args: str) -> dict[str, Any]:
    """``bench/run.py --worker ARGS`` in a fresh process with glibc malloc pinned; its JSON."""
    env = dict(os.environ)
    tunables = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{tunables}:{PINNED_MALLOC}" if tunables else PINNED_MALLOC
    command = [sys.executable, *worker_args(settings, *args)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- machine


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            caches[f"L{level}"] = size
    memory = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    from sfdiag.step_audit import fused, torch_reads

    fused._library()  # (built here, not in a figure's first round)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "fused_kernel": fused.broken() or "on",
        "torch_reads": torch_reads.status(),  # on: the grads' checks read torch's C++ API
        "caches_per_cpu0": caches,
        "memory_gib": memory,
        "torch": torch.__version__,
        "torch_threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "schedulefree": schedulefree_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
