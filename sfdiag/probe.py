"""The probe: identical model, data and seed for every optimizer; grads audited per step.

For each optimizer: a fresh model from the config's seed, the same batches in the
same order. Each step: zero grads, forward, backward, snapshot A (step pre-hook),
``optimizer.step()``, snapshot B (step post-hook). Nothing here prints; progress
goes through a callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sfdiag import __version__, snapshot, verdict
from sfdiag.audit import StepAuditor
from sfdiag.build import BuiltOptimizer, BuiltProbe, build
from sfdiag.config import Config
from sfdiag.results import OptimizerResult, ProbeReport, StepRecord

#: called after every step: (optimizer label, step index, steps in all)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ProbeOptions:
    forensics: bool = False  # clone whole grads: exact per-element changes, more memory
    progress: Progress | None = None


class ProbeInterrupted(Exception):
    """Ctrl-C during a probe; ``report`` holds the optimizers finished before it."""

    def __init__(self, report: ProbeReport):
        super().__init__("interrupted")
        self.report = report


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _set_train_mode(optimizer: Any) -> None:
    """Schedule-free optimizers must be in train mode to step; others have no train()."""
    train = getattr(optimizer, "train", None)
    if callable(train):
        train()


def _state_bytes_per_element(optimizer: Any, model: torch.nn.Module) -> float:
    elements = sum(p.numel() for p in model.parameters())
    return snapshot.state_bytes(optimizer) / elements if elements else 0.0


class Sharding:
    """How a probe runs on one rank of a distributed probe (``sfdiag.probe_dist``); this
    base class is the plain one-process probe: nothing wrapped, nothing split."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def share(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of a batch."""
        return x, y

    def step_values(self, loss: float, observed: Any) -> tuple[float, float, float]:
        """The step's (loss, pre, post grad norm) of the whole batch and model, from this
        rank's loss and observation."""
        return loss, observed.pre_norm, observed.post_norm


@dataclass(frozen=True)
class _Unhooked:
    """What the auditor reads of an optimizer that has no step hooks: the model's params."""

    optimizer: Any
    params: list[torch.Tensor]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.params}]

    @property
    def state(self) -> Any:
        return getattr(self.optimizer, "state", {})


def probe_optimizer(
    built: BuiltProbe,
    opt: BuiltOptimizer,
    options: ProbeOptions = ProbeOptions(),
    sharding: Sharding = Sharding(),
) -> OptimizerResult:
    """Run one optimizer's probe; a failure to construct or step becomes an error row."""
    spec, steps_total = opt.spec, built.config.steps
    plain = built.model_factory().to(built.device)
    plain.train()
    auditor = StepAuditor(forensics=options.forensics)
    step_records: list[StepRecord] = []
    error = None
    optimizer = None
    model = plain
    try:
        model = sharding.wrap(plain)  # FSDP2 swaps in DTensor parameters: name them after
        auditor.names.update({id(p): name for name, p in plain.named_parameters()})
        optimizer = opt.factory(model.parameters(), **spec.kwargs)
        _set_train_mode(optimizer)
        # torch.optim.Optimizer subclasses are audited through their step hooks; any other
        # object with step() by snapshots taken around the call, over the model's parameters.
        hooked = hasattr(optimizer, "register_step_pre_hook")
        watched = optimizer if hooked else _Unhooked(optimizer, list(model.parameters()))
        if hooked:
            auditor.attach(optimizer)
        for index, (x, y) in enumerate(built.batches):
            x, y = sharding.share(x.to(built.device), y.to(built.device))
            optimizer.zero_grad(set_to_none=True)
            loss = built.loss_fn(model(x), y)
            loss.backward(create_graph=spec.create_graph)
            loss_value = float(loss.detach())
            if spec.closure:

                def closure(x=x, y=y, optimizer=optimizer):
                    with torch.enable_grad():
                        optimizer.zero_grad(set_to_none=False)
                        again = built.loss_fn(model(x), y)
                        again.backward(create_graph=spec.create_graph)
                    auditor.retake(watched)  # the grads step() sees are these
                    return again

                step_args: tuple = (closure,)
            else:
                step_args = ()
            seen = len(auditor.observations)
            if not hooked:
                auditor.pre_step(watched)
            optimizer.step(*step_args)
            if not hooked:
                auditor.post_step(watched)
            if len(auditor.observations) == seen:
                raise RuntimeError("step() ran without firing the optimizer's step hooks")
            observed = auditor.observations[-1]
            step_records.append(
                StepRecord(
                    index, *sharding.step_values(loss_value, observed), observed.params_mutated
                )
            )
            if options.progress:
                options.progress(spec.name, index + 1, steps_total)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the optimizer (or the user's model) failed: an error row
        error = _error_text(exc)
    finally:
        auditor.detach()
    observations = auditor.observations[: len(step_records)]
    return verdict.summarize(
        spec.name,
        opt.cls_name,
        step_records,
        [o.params for o in observations],
        error=error,
        state_bytes_per_element=(
            round(_state_bytes_per_element(optimizer, model), 3) if optimizer is not None else None
        ),
    )


def run_probe(config: Config, options: ProbeOptions = ProbeOptions()) -> ProbeReport:
    """Probe every optimizer of ``config``. Raises SfdiagError on bad input, before running."""
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
        from sfdiag.probe_dist import run_distributed

        return run_distributed(config, options)
    try:
        for opt in built.optimizers:
            results.append(probe_optimizer(built, opt, options))
    except KeyboardInterrupt:
        raise ProbeInterrupted(report(interrupted=True)) from None
    return report()
