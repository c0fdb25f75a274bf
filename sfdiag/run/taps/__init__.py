"""Taps on the logging calls of the loggers people train with: one module per logger.

Every tap module has ``LOGGER`` (the name reports use) and ``install(sink) ->
uninstall``. A tap patches its package's public logging call only once the script
has imported that package (never importing it itself), hands each call on unchanged,
and records through ``sink.record(logger, [(name, value), ...], module=None, step=None)``
(``step``: the step number the call was given, if any) only while ``sink.is_active()``.
Adding a logger is one new module and one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol


class Sink(Protocol):
    def is_active(self) -> bool: ...

    def record(
        self,
        logger: str,
        items: Iterable[tuple[Any, Any]],
        module: Any = None,
        step: Any = None,
    ) -> None: ...


#: logger name -> the module of its tap
TAPS = {
    "tensorboard": "sfdiag.run.taps.tensorboard",
    "wandb": "sfdiag.run.taps.wandb",
    "mlflow": "sfdiag.run.taps.mlflow",
    "lightning": "sfdiag.run.taps.lightning",
    "transformers": "sfdiag.run.taps.transformers",
}


def install_all(sink: Sink) -> Callable[[], None]:
    """Install every tap; returns the function that removes them all."""
    removers = [importlib.import_module(module).install(sink) for module in TAPS.values()]

    def uninstall() -> None:
        for remove in reversed(removers):
            remove()

    return uninstall
