"""``SfdiagCallback`` for Lightning: ``sfdiag.audit()`` around every ``trainer.fit``.

    from sfdiag.integrations.lightning import SfdiagCallback
    trainer = Trainer(callbacks=[SfdiagCallback()], ...)  # report=, plot=, strict=, metrics=

- The audit starts in ``setup("fit")`` (before ``configure_optimizers``, so it sees the
  optimizers made) and ends in ``on_fit_end``: after the last step, the last checkpoint
  (``ModelCheckpoint(save_last=True)`` saves in ``on_train_end``) and teardown, before the
  loggers are finalized.
- While training: after the first 20 optimizer steps, then every 100, each logged
  metric judged wrong so far is named once through ``rank_zero_warn``.
- At the end, through every logger of ``trainer.loggers``: TensorBoard (text per verdict,
  scalars, the report as a markdown text, the plot as an image), W&B (the run's
  summary, the plot as a ``wandb.Image``), MLflow (tags, metrics, the plot as an
  artifact), CSV and any other logger (numbers through ``log_metrics``, strings through
  ``log_hyperparams``).
- ``strict=True`` raises ``AuditFailed`` in ``on_fit_end``, never mid-run.
- DDP / FSDP / model-parallel strategies (``trainer.world_size > 1``): each rank audits,
  rank 0 gets the job's report over sfdiag's own channel (as ``sfdiag run``) and alone
  shows, writes, logs, warns and raises; the other ranks log nothing of sfdiag's.

Imports ``lightning.pytorch`` (``pytorch_lightning`` where that is what is installed).
"""

from __future__ import annotations

import os
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
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn
except ImportError:  # pragma: no cover - the older package name
    try:
        import pytorch_lightning as pl
        from pytorch_lightning.utilities.rank_zero import rank_zero_warn
    except ImportError as exc:
        raise ImportError(
            "sfdiag.integrations.lightning needs Lightning: pip install lightning"
        ) from exc

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.dist import Job
    from sfdiag.results import ProbeReport

__all__ = ["AuditFailed", "SfdiagCallback"]


def _job(trainer: Any) -> Job | None:
    from sfdiag.dist import Job

    world = int(getattr(trainer, "world_size", 1) or 1)
    if world <= 1:
        return None
    return Job(int(trainer.global_rank), world, int(getattr(trainer, "local_rank", 0)))


class SfdiagCallback(pl.Callback):
    """The in-process audit of ``sfdiag.audit()`` from the start of ``fit`` to its end,
    its results logged through the trainer's loggers (see the module doc).

    Options as ``sfdiag.audit()``: ``report`` (a JSON report path), ``plot`` (True: the
    picture to the loggers; a path: also written there), ``strict``, ``metrics``,
    ``show``, ``metric_rtol``, ``force``, ``quiet``. ``callback.report`` is the last
    fit's ProbeReport. Each fit is audited on its own (a second ``fit`` writes ``report``
    again: pass ``force=True``).
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
        super().__init__()
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

    @property
    def report(self) -> ProbeReport | None:
        return self.sfdiag.report

    # ---- hooks ---------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.sfdiag.start(_job(trainer))

    def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        for message in self.sfdiag.early_warnings(trainer.global_step):
            rank_zero_warn(message)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        report = self.sfdiag.finish()
        if report is not None and trainer.is_global_zero:
            self._log(trainer, report)
        self.sfdiag.check_strict()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, AuditFailed) or not self.sfdiag.running:
            return
        report = self.sfdiag.finish(error=exception)  # the report of the steps that ran
        if report is not None and trainer.is_global_zero:
            self._log(trainer, report)

    # ---- the loggers -----------------------------------------------------------------------
    def _log(self, trainer: Any, report: ProbeReport) -> None:
        self.sfdiag.log_through(report, int(trainer.global_step), list(trainer.loggers), _writer)


def _writer(
    kinds: set[str],
    logger: Any,
    report: ProbeReport,
    strings: dict[str, str],
    numbers: dict[str, float],
    step: int,
    picture: Path | None,
) -> Any:
    def tensorboard() -> None:
        to_tensorboard(logger.experiment, report, strings, numbers, step, picture)

    def wandb() -> None:
        import wandb as wandb_module

        to_wandb(logger.experiment, wandb_module.Image, strings, numbers, picture)

    def mlflow() -> None:
        client, run_id = logger.experiment, logger.run_id
        for key, text in strings.items():
            client.set_tag(run_id, mlflow_key(key), text)
        logger.log_metrics({mlflow_key(k): v for k, v in numbers.items()}, step)
        if picture is not None:
            client.log_artifact(run_id, str(picture), "sfdiag")

    def other() -> None:  # CSVLogger and the rest: numbers as metrics, strings as params
        logger.log_metrics(numbers, step)
        logger.log_hyperparams(strings)
        save = getattr(logger, "save", None)
        if callable(save):
            save()

    if "TensorBoardLogger" in kinds:
        return tensorboard
    if "WandbLogger" in kinds:
        return wandb
    if "MLFlowLogger" in kinds:
        return mlflow
    return other
