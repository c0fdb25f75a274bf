"""Lightning: ``LightningModule.log`` (``log_dict`` calls it per entry), at the moment of
the call, with the module for parameter names (``grad_2.0_norm/net.0.weight``).

What Lightning's loggers later write (TensorBoardLogger's SummaryWriter, WandbLogger's
run...) is the same value: the TensorBoard, W&B and MLflow taps stand aside while
Lightning's logger connector hands metrics on.
"""

from __future__ import annotations

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


_CONNECTOR = "trainer.connectors.logger_connector.logger_connector"
install = installer(
    {
        "lightning.pytorch.core.module": _patch_module,
        "pytorch_lightning.core.module": _patch_module,
        f"lightning.pytorch.{_CONNECTOR}": _patch_connector,
        f"pytorch_lightning.{_CONNECTOR}": _patch_connector,
    }
)
