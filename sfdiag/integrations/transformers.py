"""``SfdiagCallback`` for the Hugging Face ``Trainer``: ``sfdiag.audit()`` around ``train()``.

    from sfdiag.integrations.transformers import SfdiagCallback
    Trainer(model, args, callbacks=[SfdiagCallback()])  # report=, plot=, strict=, metrics=

- The audit starts in ``on_train_begin`` (the Trainer has made its optimizer by then:
  the optimizer is watched from its first step) and ends in ``on_train_end``, after the
  last step, its log and its checkpoint.
- While training: after the first 20 optimizer steps, then every 100, each logged
  metric judged wrong so far is named once through the ``transformers`` logger
  (``transformers.sfdiag``, so ``TRANSFORMERS_VERBOSITY`` applies).
- At the end, through the Trainer's ``report_to`` integrations: TensorBoard (text per
  verdict, scalars, the report as a markdown text, the plot as an image), W&B (the
  run's summary, the plot as a ``wandb.Image``), MLflow (tags, metrics, the plot as an
  artifact). So that they still take entries, the callback puts a small reporter first
  in the Trainer's callback list (they close their writers in their own
  ``on_train_end``) and itself last, so ``strict=True`` raises ``AuditFailed`` after
  every other callback has ended the training; never mid-run.
- Several processes (``args.world_size > 1``): each rank audits, rank 0 (the world
  process zero) gets the job's report over sfdiag's own channel and alone shows,
  writes, logs, warns and raises; the other ranks log nothing of sfdiag's.
- The Trainer tells callbacks of no exception: where ``train()`` raises, the audit stays
  installed until ``callback.close()`` (or the next ``train()``) removes it.

Imports ``transformers``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfdiag.integrations import (
    AuditFailed,
    CallbackAudit,
    mlflow_key,
    to_tensorboard,
    to_wandb,
)

try:
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "sfdiag.integrations.transformers needs transformers: pip install transformers"
    ) from exc

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.dist import Job
    from sfdiag.results import ProbeReport

__all__ = ["AuditFailed", "SfdiagCallback"]

logger = hf_logging.get_logger("transformers.sfdiag")


def _job(args: Any) -> Job | None:
    from sfdiag.dist import Job

    world = int(getattr(args, "world_size", 1) or 1)
    if world <= 1:
        return None
    return Job(int(args.process_index), world, int(getattr(args, "local_process_index", 0)))


def _handler_of(callback: Any) -> Any:
    """The Trainer's ``CallbackHandler`` running ``callback`` now (the caller's frames:
    callbacks are not handed the Trainer); None where it cannot be found."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        callbacks = getattr(owner, "callbacks", None)
        if (
            isinstance(callbacks, list)
            and hasattr(owner, "call_event")
            and any(c is callback for c in callbacks)
        ):
            return owner
        frame = frame.f_back
    return None


class _Reporter(TrainerCallback):
    """First in the Trainer's list: ends the audit and logs it in ``on_train_end``,
    before the integrations close their writers."""

    def __init__(self, owner: SfdiagCallback) -> None:
        self.owner = owner

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.owner._report(args, state)


class SfdiagCallback(TrainerCallback):
    """The in-process audit of ``sfdiag.audit()`` from ``on_train_begin`` to
    ``on_train_end``, its results logged through the Trainer's ``report_to``
    integrations (see the module doc).

    Options as ``sfdiag.audit()``: ``report`` (a JSON report path), ``plot`` (True: the
    picture to the loggers; a path: also written there), ``strict``, ``metrics``,
    ``show``, ``metric_rtol``, ``force``, ``quiet``. ``callback.report`` is the last
    ``train()``'s ProbeReport.
    """

    def __init__(
        self,
        report: str | os.PathLike[str] | None = None,
        *,
        plot: bool | str | os.PathLike[str] | None = None,
        strict: bool = False,
        metrics: tuple[str, ...] | list[str] = (),
        show: bool = True,
        metric_rtol: float = 1e-3,
        force: bool = False,
        quiet: bool = False,
    ) -> None:
        self.sfdiag = CallbackAudit(
            report,
            plot=plot,
            strict=strict,
            metrics=metrics,
            show=show,
            metric_rtol=metric_rtol,
            force=force,
            quiet=quiet,
        )
        self._handler: Any = None
        self._reporter = _Reporter(self)

    @property
    def report(self) -> ProbeReport | None:
        return self.sfdiag.report

    def close(self) -> None:
        """Remove an audit left running by a ``train()`` that raised (builds its report)."""
        if self.sfdiag.running:
            self.sfdiag.finish(error=RuntimeError("train() did not end"))

    # ---- hooks ---------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        handler = _handler_of(self)
        if handler is not None:  # a new list: the one being iterated goes on unchanged
            others = [c for c in handler.callbacks if c is not self and c is not self._reporter]
            handler.callbacks = [self._reporter, *others, self]
        self._handler = handler
        self.sfdiag.start(_job(args))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        messages = self.sfdiag.early_warnings(state.global_step)
        if state.is_world_process_zero:
            for message in messages:
                logger.warning(message)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._report(args, state)  # done already where the reporter ran first
        self.sfdiag.check_strict()

    # ---- the loggers -----------------------------------------------------------------------
    def _report(self, args: Any, state: Any) -> None:
        report = self.sfdiag.finish()
        if report is None or not state.is_world_process_zero:
            return
        handler = self._handler if self._handler is not None else _handler_of(self)
        callbacks = list(getattr(handler, "callbacks", ()))
        self.sfdiag.log_through(report, int(state.global_step), callbacks, _writer)


def _writer(
    kinds: set[str],
    callback: Any,
    report: ProbeReport,
    strings: dict[str, str],
    numbers: dict[str, float],
    step: int,
    picture: Path | None,
) -> Any:
    def tensorboard() -> None:
        writer, opened = callback.tb_writer, False
        if writer is None:  # closed already, or never opened on this process
            writer, opened = callback._SummaryWriter(log_dir=callback.logging_dir), True
        to_tensorboard(writer, report, strings, numbers, step, picture)
        if opened:
            writer.close()

    def wandb() -> None:
        run = getattr(callback._wandb, "run", None)
        if run is None:
            return
        to_wandb(run, callback._wandb.Image, strings, numbers, picture)

    def mlflow() -> None:
        mlflow_module = callback._ml_flow
        if not getattr(callback, "_initialized", False) or mlflow_module.active_run() is None:
            return
        mlflow_module.set_tags({mlflow_key(k): v for k, v in strings.items()})
        mlflow_module.log_metrics({mlflow_key(k): v for k, v in numbers.items()}, step=step)
        if picture is not None:
            mlflow_module.log_artifact(str(picture), artifact_path="sfdiag")

    if "TensorBoardCallback" in kinds:
        return tensorboard
    if "WandbCallback" in kinds:
        return wandb
    if "MLflowCallback" in kinds:
        return mlflow
    return None
