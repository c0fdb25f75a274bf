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
    "GradMonitor": ("sfdiag.monitor", "GradMonitor"),
    "run_probe": ("sfdiag.probe", "run_probe"),
    "audit": ("sfdiag.inprocess", "audit"),
}

if TYPE_CHECKING:  # pragma: no cover
    from sfdiag.inprocess import audit
    from sfdiag.monitor import GradMonitor
    from sfdiag.probe import run_probe


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sfdiag' has no attribute {name!r}")
