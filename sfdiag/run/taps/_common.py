"""Building blocks of the tap modules: read a call's arguments, patch a callable."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sfdiag.run.taps._hooks import Patches, guarded, when_imported

Extract = Callable[[tuple, dict], Iterable[tuple[Any, Any]]]
#: the step number a logging call was given (``global_step=``, ``step=``), or None
StepOf = Callable[[tuple, dict], Any]


def argument(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """The argument at position ``index`` or by keyword ``name``."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def items_of(mapping: Any) -> Iterable[tuple[Any, Any]]:
    return list(mapping.items()) if hasattr(mapping, "items") else ()


def tap(
    patches: Patches,
    owner: Any,
    attribute: str,
    sink: Any,
    logger: str,
    extract: Extract,
    module_of: Callable[[tuple, dict], Any] | None = None,
    step_of: StepOf | None = None,
) -> None:
    """Patch ``owner.attribute`` to record ``extract(args, kwargs)`` (with the module and
    the step number the call names, where it names them) and then call through."""
    original = getattr(owner, attribute, None)
    if original is None or getattr(original, "_sfdiag_tap", False):
        return

    def recording(*args: Any, **kwargs: Any) -> Any:
        try:
            items = extract(args, kwargs)
            module = module_of(args, kwargs) if module_of is not None else None
            step = step_of(args, kwargs) if step_of is not None else None
        except Exception:  # arguments we cannot read: the logger gets them as they are
            items, module, step = (), None, None
        sink.record(logger, items, module, step=step)
        return original(*args, **kwargs)

    patches.set(owner, attribute, guarded(original, recording, sink.is_active))


def installer(
    targets: dict[str, Callable[[Any, Patches, Any], None]],
) -> Callable[[Any], Callable[[], None]]:
    """``install(sink)`` for a tap: run ``targets[module](module, patches, sink)`` once each
    module is imported; the uninstaller cancels what still waits and undoes the patches."""

    def install(sink: Any) -> Callable[[], None]:
        patches = Patches()
        cancels = [
            when_imported(name, lambda module, patch=patch: patch(module, patches, sink))
            for name, patch in targets.items()
        ]

        def uninstall() -> None:
            for cancel in cancels:
                cancel()
            patches.undo()

        return uninstall

    return install
