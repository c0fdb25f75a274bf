"""Lightning: ``LightningModule.log`` (``log_dict`` calls it per entry), at the moment of
the call, with the module for parameter names (``grad_2.0_norm/net.0.weight``).

``LearningRateMonitor``: the rates its ``_extract_stats`` reads from the param groups
(``lr-AdamW``, ``lr-AdamW/pg2``), with the step number it logs them at (the optimizer
steps done: it logs as a batch starts, the scheduler having moved on to that batch).

What Lightning's loggers later write (TensorBoardLogger's SummaryWriter, WandbLogger's
run...) is the same value: the TensorBoard, W&B and MLflow taps stand aside while
Lightning's logger connector, or the rate monitor, hands metrics on.
"""

from __future__ import annotations

import functools
from typing import Any

from sfdiag.run.taps._common import argument, installer, tap
from sfdiag.run.taps._hooks import Patches, standing_aside

LOGGER = "lightning"


def _items(args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    return [(argument(args, kwargs, 1, "name"), argument(args, kwargs, 2, "value"))]


def _module(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else None


def _patch_module(module: Any, patches: Patches, sink: Any) -> None:
    tap(patches, module.LightningModule, "log", sink, LOGGER, _items, module_of=_module)


def _patch_connector(module: Any, patches: Patches, sink: Any) -> None:
    connector = getattr(module, "_LoggerConnector", None)
    original = getattr(connector, "log_metrics", None)
    if original is not None:
        patches.set(connector, "log_metrics", standing_aside(original))


#: what LearningRateMonitor logs beside each rate
_NOT_RATES = ("-momentum", "-weight_decay")


def _steps_done(trainer: Any) -> Any:
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _patch_rate_monitor(module: Any, patches: Patches, sink: Any) -> None:
    monitor = getattr(module, "LearningRateMonitor", None)
    extract = getattr(monitor, "_extract_stats", None)
    if extract is None or getattr(extract, "_sfdiag_tap", False):
        return

    @functools.wraps(extract)
    def recording(self: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        stats = extract(self, trainer, *args, **kwargs)
        if sink.is_active():  # called inside the hooks below, where the logger taps stand aside
            try:
                items = [(k, v) for k, v in stats.items() if not str(k).endswith(_NOT_RATES)]
                step = _steps_done(trainer)
            except Exception:
                items, step = [], None
            sink.record(LOGGER, items, None, step=step)
        return stats

    recording._sfdiag_tap = True  # type: ignore[attr-defined]
    patches.set(monitor, "_extract_stats", recording)
    for hook in ("on_train_batch_start", "on_train_epoch_start"):
        original = getattr(monitor, hook, None)
        if original is not None:  # its loggers hand on what _extract_stats recorded
            patches.set(monitor, hook, standing_aside(original))


_CONNECTOR = "trainer.connectors.logger_connector.logger_connector"
_MONITOR = "callbacks.lr_monitor"
install = installer(
    {
        "lightning.pytorch.core.module": _patch_module,
        "pytorch_lightning.core.module": _patch_module,
        f"lightning.pytorch.{_CONNECTOR}": _patch_connector,
        f"pytorch_lightning.{_CONNECTOR}": _patch_connector,
        f"lightning.pytorch.{_MONITOR}": _patch_rate_monitor,
        f"pytorch_lightning.{_MONITOR}": _patch_rate_monitor,
    }
)
