"""Hugging Face Transformers: ``Trainer.log(logs)``, which every report_to integration
(TensorBoard, W&B, MLflow callbacks) receives its values from; its step number is the
Trainer's ``state.global_step`` (the optimizer steps done)."""

from __future__ import annotations

from typing import Any

from sfdiag.run.taps._common import argument, installer, items_of, tap
from sfdiag.run.taps._hooks import Patches

LOGGER = "transformers"


def _items(args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    return list(items_of(argument(args, kwargs, 1, "logs")))


def _global_step(args: tuple, kwargs: dict) -> Any:
    return args[0].state.global_step  # args[0] is the Trainer


def _patch(module: Any, patches: Patches, sink: Any) -> None:
    tap(patches, module.Trainer, "log", sink, LOGGER, _items, step_of=_global_step)


install = installer({"transformers.trainer": _patch})
