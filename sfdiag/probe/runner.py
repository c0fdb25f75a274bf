"""The probe: identical model, data and seed for every optimizer; grads audited per step.

For each optimizer: a fresh model from the config's seed, the same batches in the
same order. Each step: zero grads, forward, backward, snapshot A (step pre-hook),
``optimizer.step()``, snapshot B (step post-hook); an optimizer without working step
hooks is snapshotted just before and after the call instead. A failure is an error row
that says who failed. Nothing here prints; progress goes through a callback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from sfdiag.errors import SfdiagError
from sfdiag.probe.build import BuiltOptimizer, BuiltProbe
from sfdiag.probe.config import Config, load_config, parse_config
from sfdiag.results import OptimizerResult, ProbeReport, StepRecord
from sfdiag.step_audit import snapshot, verdict
from sfdiag.step_audit.auditor import AuditError, StepAuditor, StepWatch, exception_text

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


class ProbeFailure(Exception):
    """A probe that could not finish, with who failed (one of ``verdict.FAILURES``)."""

    def __init__(self, failure: str, message: str):
        super().__init__(message)
        self.failure = failure
        self.message = message


@contextmanager
def _failing_as(failure: str, what: str) -> Iterator[None]:
    """Any error inside is ``failure``'s, worded ``"{what} raised TypeError: ..."``; a
    failure already attributed (further in: a closure's model, sfdiag's hooks) keeps its."""
    try:
        yield
    except (ProbeFailure, AuditError):
        raise
    except Exception as exc:
        raise ProbeFailure(failure, f"{what} raised {exception_text(exc)}") from exc


def _checked_loss(loss: Any) -> torch.Tensor:
    """The loss, if it is one number; a ProbeFailure of the model's saying what it was."""
    if not isinstance(loss, torch.Tensor):
        raise ProbeFailure(
            "model",
            f"the loss returned {type(loss).__name__}, not a tensor: a loss must be a "
            "scalar tensor",
        )
    if loss.numel() != 1:
        raise ProbeFailure(
            "model",
            f"the loss returned a non-scalar (a tensor of shape {tuple(loss.shape)}): a loss "
            "must be one number (reduce it, with mean or sum)",
        )
    return loss


def _set_train_mode(optimizer: Any) -> None:
    """Schedule-free optimizers must be in train mode to step; others have no train()."""
    train = getattr(optimizer, "train", None)
    if callable(train):
        train()


def _state_bytes_per_element(optimizer: Any, model: torch.nn.Module) -> float:
    elements = sum(p.numel() for p in model.parameters())
    return snapshot.state_bytes(optimizer) / elements if elements else 0.0


class Sharding:
    """How a probe runs on one rank of a distributed probe (``sfdiag.probe.distributed``); this
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


def _state_bytes_or_none(optimizer: Any, model: torch.nn.Module) -> float | None:
    if optimizer is None:
        return None
    try:
        return round(_state_bytes_per_element(optimizer, model), 3)
    except Exception:  # an odd state: the column is empty, the verdict stands
        return None


def probe_optimizer(
    built: BuiltProbe,
    opt: BuiltOptimizer,
    options: ProbeOptions = ProbeOptions(),
    sharding: Sharding = Sharding(),
) -> OptimizerResult:
    """Run one optimizer's probe. A failure is an error row that says who failed: the
    optimizer (constructing or stepping), the model or the loss, or sfdiag itself."""
    spec, steps_total = opt.spec, built.config.steps
    plain = built.model_factory().to(built.device)
    plain.train()
    auditor = StepAuditor(forensics=options.forensics)
    step_records: list[StepRecord] = []
    error = failure = None
    optimizer = None
    watch = None
    model = plain
    try:
        with _failing_as("model", "wrapping the model for the distributed probe"):
            model = sharding.wrap(plain)  # FSDP2 swaps in DTensor parameters: name them after
        auditor.names.update({id(p): name for name, p in plain.named_parameters()})
        with _failing_as("construct", "the optimizer's constructor"):
            optimizer = opt.factory(model.parameters(), **spec.kwargs)
        with _failing_as("step", "the optimizer's train()"):
            _set_train_mode(optimizer)
        # torch optimizers are audited through their step hooks; any other object with
        # step() (or one without hooks) by snapshots taken around the call
        watch = StepWatch.start(auditor, optimizer, list(model.parameters()))

        def forward_backward(x: Any, y: Any) -> torch.Tensor:
            with _failing_as("model", "the model's forward"):
                output = model(x)
            with _failing_as("model", "the loss"):
                loss = _checked_loss(built.loss_fn(output, y))
            with _failing_as("model", "backward() through the model and loss"):
                loss.backward(create_graph=spec.create_graph)
            return loss

        for index, (x, y) in enumerate(built.batches):
            x, y = sharding.share(x.to(built.device), y.to(built.device))
            with _failing_as("step", "the optimizer's zero_grad()"):
                watch.zero_grad(set_to_none=True)
            loss = forward_backward(x, y)
            loss_value = float(loss.detach())
            if spec.closure:

                def closure(x=x, y=y):
                    with torch.enable_grad():
                        with _failing_as("step", "the optimizer's zero_grad()"):
                            watch.zero_grad(set_to_none=False)
                        again = forward_backward(x, y)
                    watch.retake()  # the grads step() sees are these
                    return again

                step_args: tuple = (closure,)
            else:
                step_args = ()
            watch.before_step()
            with _failing_as("step", "the optimizer's step()"):
                optimizer.step(*step_args)
            observed = watch.after_step()
            step_records.append(
                StepRecord(
                    index, *sharding.step_values(loss_value, observed), observed.params_mutated
                )
            )
            if options.progress:
                options.progress(spec.name, index + 1, steps_total)
    except KeyboardInterrupt:
        raise
    except ProbeFailure as failed:
        error, failure = failed.message, failed.failure
    except AuditError as exc:
        error, failure = str(exc), "sfdiag"
    except Exception as exc:  # not in any attributed part: sfdiag's own code
        error, failure = f"{verdict.SFDIAG_FAILED}: {exception_text(exc)}", "sfdiag"
    finally:
        if watch is not None:
            watch.detach()
    observations = auditor.observations[: len(step_records)]
    return verdict.summarize(
        spec.name,
        opt.cls_name,
        step_records,
        [o.params for o in observations],
        error=error,
        failure=failure,
        state_bytes_per_element=_state_bytes_or_none(optimizer, model),
        nan_only=bool(observations) and all(o.nan_only for o in observations),
    )


def as_config(config: Any) -> Config:
    """A Config from a config file's path (str or PathLike), a dict shaped like the YAML, or
    a Config; anything else is an SfdiagError naming what it got."""
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    if isinstance(config, Mapping):
        return parse_config(config, "<dict>")
    shown = repr(config)
    shown = shown if len(shown) <= 60 else shown[:59] + "…"
    raise SfdiagError(
        "run_probe: config must be a config file's path (str or os.PathLike), a dict "
        f"shaped like the YAML config, or a sfdiag.probe.config.Config; got "
        f"{type(config).__name__} {shown}"
    )


@contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """On CUDA, cuDNN's deterministic algorithms (and no benchmarking, which may pick
    another one a run): a seeded probe repeats bit for bit. Restored afterwards."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved
