"""sfdiag: find optimizers that mutate ``p.grad`` in place.

Importing this package is cheap: torch is imported only when an attribute that
needs it (``GradMonitor``, ``probe``) is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sfdiag.errors import SfdiagError

__version__ = "0.1.0"

__all__ = ["GradMonitor", "SfdiagError", "__version__", "audit", "run_probe"]

_LAZY = {
    "GradMonitor": ("sfdiag.step_audit.monitor", "GradMonitor"),
    "run_probe": ("sfdiag.probe.api", "run_probe"),
    "audit": ("sfdiag.run.inprocess", "audit"),
}

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.probe.api import run_probe
    from sfdiag.run.inprocess import audit
    from sfdiag.step_audit.monitor import GradMonitor


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sfdiag' has no attribute {name!r}")
