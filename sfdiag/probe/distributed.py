"""Probes under sharding: a config's ``distributed: {nproc, strategy}``.

The probe runs on ``nproc`` local ranks started by torch's elastic launcher (gloo, CPU).
Every rank builds the same model from the seed, wraps it in DistributedDataParallel
(``ddp``) or FSDP2's ``fully_shard`` (``fsdp2``: DTensor parameters and grads), and takes
its share of every batch, so the ranks together step the one-process probe's gradients.
Each rank audits its own grads (a DTensor's local shard); the step's norms are the whole
model's (sums of squares over the ranks where the grads are sharded), and an optimizer's
verdict is its worst rank's. What the probe finds must equal what one process finds:
sharding changes where the numbers live, not what the optimizer does to them.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from sfdiag.errors import SfdiagError
from sfdiag.probe.config import Config
from sfdiag.probe.runner import ProbeInterrupted, ProbeOptions, Sharding
from sfdiag.results import OptimizerResult, ProbeReport
from sfdiag.step_audit.verdict import SEVERITY


class RankSharding(Sharding):
    """This rank's part: wrap the model, take the rank's share, sum what is sharded."""

    def __init__(self, strategy: str, rank: int, world_size: int) -> None:
        self.strategy = strategy
        self.rank = rank
        self.world_size = world_size

    def wrap(self, model: Any) -> Any:
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model)
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):  # every layer with parameters, then the root
            if module is not model and any(True for _ in module.parameters(recurse=False)):
                fully_shard(module)
        fully_shard(model)
        return model

    def share(self, x: Any, y: Any) -> tuple[Any, Any]:
        return x.chunk(self.world_size)[self.rank], y.chunk(self.world_size)[self.rank]

    def step_values(self, loss: float, observed: Any) -> tuple[float, float, float]:
        import torch
        import torch.distributed as dist

        sharded = self.strategy == "fsdp2"
        squares = (observed.pre_norm**2, observed.post_norm**2) if sharded else (0.0, 0.0)
        values = torch.tensor([loss, *squares], dtype=torch.float64)
        dist.all_reduce(values)
        total_loss, pre_sq, post_sq = values.tolist()
        if not sharded:  # DDP: every rank holds the whole, all-reduced grads
            return total_loss / self.world_size, observed.pre_norm, observed.post_norm
        return total_loss / self.world_size, pre_sq**0.5, post_sq**0.5


def _worst_of_ranks(results: list[OptimizerResult], gathered: list[Any]) -> list[OptimizerResult]:
    """Each optimizer's verdict is its worst rank's (rank 0's numbers stay)."""
    out = []
    for index, result in enumerate(results):
        worst = result
        for rank_rows in gathered:
            verdict, fingerprint, error, advice = rank_rows[index]
            if SEVERITY[verdict] > SEVERITY[worst.verdict]:
                worst = replace(  # a worse verdict is a finding: no longer undetermined
                    worst,
                    verdict=verdict,
                    fingerprint=fingerprint,
                    error=error,
                    advice=advice,
                    undetermined=False,
                )
        out.append(worst)
    return out


def _rank_main(config: Config, forensics: bool) -> ProbeReport | None:
    """One rank of the job (started by the launcher, in a fresh interpreter)."""
    import datetime
    import time

    import torch
    import torch.distributed as dist

    from sfdiag import __version__
    from sfdiag.probe.build import build
    from sfdiag.probe.runner import probe_optimizer

    spec = config.distributed
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        sharding = RankSharding(spec.strategy, rank, world)
        built = build(config)
        started = time.perf_counter()
        options = ProbeOptions(forensics=forensics)
        results = [probe_optimizer(built, opt, options, sharding) for opt in built.optimizers]
        rows = [(r.verdict, r.fingerprint, r.error, r.advice) for r in results]
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        report = ProbeReport(
            config=config.to_dict(),
            results=tuple(_worst_of_ranks(results, gathered)),
            sfdiag_version=__version__,
            torch_version=torch.__version__,
            timing={"seconds": round(time.perf_counter() - started, 3)},
            device=built.device.type,
        )
        return report if rank == 0 else None
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(config: Config, options: ProbeOptions) -> ProbeReport:
    """Run the probe of ``config`` on its ranks; rank 0's merged report."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=config.distributed.nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        returned = elastic_launch(launch, _rank_main)(config, options.forensics)
    except (KeyboardInterrupt, SignalException):
        from sfdiag import __version__

        raise ProbeInterrupted(
            ProbeReport(config.to_dict(), (), __version__, "", interrupted=True)
        ) from None
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        message = failure.message if isinstance(failure.message, str) else str(failure.message)
        raise SfdiagError(
            f"distributed: the probe failed on rank {rank} (exit code {failure.exitcode}): "
            f"{' '.join(message.split())[:500] or 'see its output above'}"
        ) from None
    return returned[0]
