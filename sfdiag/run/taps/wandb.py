"""Weights & Biases: ``Run.log`` (``wandb.log`` is the current run's ``log`` once
``wandb.init`` has run). Offline mode needs no network."""

from __future__ import annotations

from typing import Any

from sfdiag.run.taps._common import argument, installer, items_of, tap
from sfdiag.run.taps._hooks import Patches

LOGGER = "wandb"


def _items(args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    return list(items_of(argument(args, kwargs, 1, "data")))


def _step(args: tuple, kwargs: dict) -> Any:
    return argument(args, kwargs, 2, "step")


def _patch(module: Any, patches: Patches, sink: Any) -> None:
    from wandb.sdk import wandb_run

    tap(patches, wandb_run.Run, "log", sink, LOGGER, _items, step_of=_step)


install = installer({"wandb": _patch})
