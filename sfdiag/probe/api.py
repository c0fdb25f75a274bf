"""``run_probe``: the probe's entry point, for one process (``runner``) or across ranks
(``distributed``, which builds on ``runner``: hence this module above both)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from sfdiag import __version__
from sfdiag.probe.build import build
from sfdiag.probe.config import Config
from sfdiag.probe.distributed import run_distributed
from sfdiag.probe.runner import (
    ProbeInterrupted,
    ProbeOptions,
    as_config,
    deterministic_kernels,
    probe_optimizer,
)
from sfdiag.results import OptimizerResult, ProbeReport

__all__ = ["ProbeInterrupted", "ProbeOptions", "run_probe"]


def run_probe(
    config: Config | Mapping[str, Any] | str | os.PathLike[str],
    options: ProbeOptions = ProbeOptions(),
) -> ProbeReport:
    """Probe every optimizer of ``config`` (a path, a dict or a Config; see ``as_config``).
    Raises SfdiagError on bad input, before running."""
    config = as_config(config)
    built = build(config)
    results: list[OptimizerResult] = []
    started = time.perf_counter()

    def report(interrupted: bool = False) -> ProbeReport:
        return ProbeReport(
            config=config.to_dict(),
            results=tuple(results),
            sfdiag_version=__version__,
            torch_version=torch.__version__,
            interrupted=interrupted,
            timing={"seconds": round(time.perf_counter() - started, 3)},
            device=built.device.type,
        )

    if config.distributed is not None:
        return run_distributed(config, options)
    try:
        with deterministic_kernels(built.device):
            for opt in built.optimizers:
                results.append(probe_optimizer(built, opt, options))
    except KeyboardInterrupt:
        raise ProbeInterrupted(report(interrupted=True)) from None
    return report()
