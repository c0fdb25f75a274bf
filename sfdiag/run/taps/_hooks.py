"""The machinery every tap shares: patching attributes back and forth, a reentrancy
guard, and running a callback once a module has been imported.

A tap must never change what the logger receives nor cost anything when the script
does not log, and must not import a logging package the script does not import:
``when_imported`` waits for the script's own import of the package (a ``sys.meta_path``
finder that only looks at the names it waits for) and patches right after the module's
body has run.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

_state = threading.local()


def inside_tap() -> bool:
    return getattr(_state, "depth", 0) > 0


def guarded(
    original: Callable[..., Any], wrapper: Callable[..., Any], is_active: Callable[[], bool]
) -> Callable[..., Any]:
    """``wrapper`` where no other guarded call is running and the audit is on, else
    ``original``. One logged value goes through several layers (Trainer.log calls a
    TensorBoard callback which calls SummaryWriter.add_scalar): the outermost tap records
    it, the inner ones stand aside."""

    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        if getattr(_state, "depth", 0) or not is_active():
            return original(*args, **kwargs)
        _state.depth = 1
        try:
            return wrapper(*args, **kwargs)
        finally:
            _state.depth = 0

    call.__wrapped__ = original  # type: ignore[attr-defined]
    call._sfdiag_tap = True  # type: ignore[attr-defined]
    return call


def standing_aside(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original``, with every tap standing aside while it runs (a path that hands on
    values another tap already recorded)."""

    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        depth = getattr(_state, "depth", 0)
        _state.depth = depth + 1
        try:
            return original(*args, **kwargs)
        finally:
            _state.depth = depth

    call.__wrapped__ = original  # type: ignore[attr-defined]
    return call


@dataclass
class Patches:
    """Attributes set on modules and classes, undone in reverse order."""

    _undo: list[tuple[Any, str, Any, bool]] = field(default_factory=list)

    def set(self, owner: Any, name: str, value: Any) -> None:
        had = name in vars(owner)
        self._undo.append((owner, name, vars(owner).get(name), had))
        setattr(owner, name, value)

    def extend(self, other: Patches) -> None:
        self._undo.extend(other._undo)
        other._undo = []

    def undo(self) -> None:
        while self._undo:
            owner, name, old, had = self._undo.pop()
            try:
                if had:
                    setattr(owner, name, old)
                else:
                    delattr(owner, name)
            except (AttributeError, TypeError):  # pragma: no cover - a frozen owner
                pass


# ---- after-import callbacks ---------------------------------------------------------------------
class _NotifyingLoader(importlib.abc.Loader):
    """The real loader, then the callbacks, once the module's body has run."""

    def __init__(self, loader: Any, notify: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._notify = notify

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # the module should name its real loader (inspect, importlib.resources read it)
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        self._notify(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of the modules someone waits for."""

    def __init__(self) -> None:
        self.waiting: dict[str, list[Callable[[ModuleType], None]]] = {}
        self._finding: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.waiting or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._finding.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _NotifyingLoader(spec.loader, functools.partial(self._loaded, fullname))
        return spec

    def _loaded(self, fullname: str, module: ModuleType) -> None:
        for callback in self.waiting.pop(fullname, []):
            _call_quietly(callback, module)
        if not self.waiting:
            _remove_finder()


_finder: _Finder | None = None


def _remove_finder() -> None:
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None


def _call_quietly(callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        callback(module)
    except Exception:  # a logger we do not understand is left untapped, never broken
        pass


def _imported(name: str) -> ModuleType | None:
    module = sys.modules.get(name)
    if module is None:
        return None
    spec = getattr(module, "__spec__", None)
    if spec is not None and getattr(spec, "_initializing", False):
        return None  # half-imported: its body is still running
    return module


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> Callable[[], None]:
    """Run ``callback(module)`` now if ``name`` is imported, else right after the script
    imports it. Returns a function that cancels a callback still waiting."""
    global _finder
    module = _imported(name)
    if module is not None:
        _call_quietly(callback, module)
        return lambda: None
    if _finder is None:
        _finder = _Finder()
        sys.meta_path.insert(0, _finder)
    _finder.waiting.setdefault(name, []).append(callback)

    def cancel() -> None:
        if _finder is None:
            return
        callbacks = _finder.waiting.get(name, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            _finder.waiting.pop(name, None)
        if not _finder.waiting:
            _remove_finder()

    return cancel
