"""MLflow: ``mlflow.log_metric`` / ``mlflow.log_metrics`` (the fluent API), wherever the
script looks them up (``mlflow.`` or ``mlflow.tracking.fluent.``)."""

from __future__ import annotations

from typing import Any

from sfdiag.run.taps._common import argument, installer, items_of, tap
from sfdiag.run.taps._hooks import Patches

LOGGER = "mlflow"


def _metric(args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    return [(argument(args, kwargs, 0, "key"), argument(args, kwargs, 1, "value"))]


def _metrics(args: tuple, kwargs: dict) -> list[tuple[Any, Any]]:
    return list(items_of(argument(args, kwargs, 0, "metrics")))


def _metric_step(args: tuple, kwargs: dict) -> Any:
    return argument(args, kwargs, 2, "step")


def _metrics_step(args: tuple, kwargs: dict) -> Any:
    return argument(args, kwargs, 1, "step")


def _patch(module: Any, patches: Patches, sink: Any) -> None:
    from mlflow.tracking import fluent

    for name, extract, step_of in (
        ("log_metric", _metric, _metric_step),
        ("log_metrics", _metrics, _metrics_step),
    ):
        original = getattr(fluent, name, None)
        tap(patches, fluent, name, sink, LOGGER, extract, step_of=step_of)
        wrapped = getattr(fluent, name, None)
        if wrapped is not original and getattr(module, name, None) is original:
            patches.set(module, name, wrapped)


install = installer({"mlflow": _patch})
