"""TensorBoard: ``SummaryWriter.add_scalar`` / ``add_scalars``, of torch.utils.tensorboard
and of tensorboardX. ``add_scalars("grad", {"pre": a})`` is the metric ``grad/pre``."""

from __future__ import annotations

from typing import Any

from sfdiag.run.taps._common import argument, installer, items_of, tap
from sfdiag.run.taps._hooks import Patches

LOGGER = "tensorboard"


def _scalar(args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    # args[0] is the writer
    return [(argument(args, kwargs, 1, "tag"), argument(args, kwargs, 2, "scalar_value"))]


def _scalars(args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    main_tag = argument(args, kwargs, 1, "main_tag")
    values = argument(args, kwargs, 2, "tag_scalar_dict")
    return [(f"{main_tag}/{tag}", value) for tag, value in items_of(values)]


def _global_step(args: tuple, kwargs: dict) -> Any:
    return argument(args, kwargs, 3, "global_step")


def _patch(module: Any, patches: Patches, sink: Any) -> None:
    writer = module.SummaryWriter
    tap(patches, writer, "add_scalar", sink, LOGGER, _scalar, step_of=_global_step)
    tap(patches, writer, "add_scalars", sink, LOGGER, _scalars, step_of=_global_step)


install = installer({"torch.utils.tensorboard.writer": _patch, "tensorboardX.writer": _patch})
