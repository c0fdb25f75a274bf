"""Writing output files: all or nothing, never over a file the user did not give up.

Every file sfdiag writes (reports, baselines, plots, example configs) goes through
``write_atomic``: the bytes land in a temporary file next to the target and are moved
into place with ``os.replace``, so a reader sees the old file or the whole new one,
never half of one, also when the write fails or the user presses Ctrl-C.
``check_writable`` runs the same checks up front, before a long probe.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sfdiag.errors import SfdiagError


def check_writable(
    path: str | os.PathLike[str], force: bool = False, *, what: str = "file"
) -> Path:
    """Fail now, with a clear message, if ``write_atomic(path, ..., force=force)`` would fail.

    Checks: the path is not a directory, it does not exist unless ``force``, its parent
    directory exists and is writable. Returns the path as a ``Path``.
    """
    target = Path(path)
    if target.is_dir():
        raise SfdiagError(f"cannot write {what} {target}: it is a directory")
    if (target.exists() or target.is_symlink()) and not force:
        raise SfdiagError(f"{what} {target} already exists; pass --force to overwrite it")
    parent = target.parent
    if not parent.exists():
        raise SfdiagError(f"cannot write {what} {target}: directory {parent} does not exist")
    if not parent.is_dir():
        raise SfdiagError(f"cannot write {what} {target}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SfdiagError(f"cannot write {what} {target}: directory {parent} is not writable")
    return target


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (``~``, ``..`` and links resolved)."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def write_atomic(
    path: str | os.PathLike[str],
    data: str | bytes,
    *,
    force: bool = False,
    what: str = "file",
) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically.

    Refuses to replace an existing file unless ``force``. Any problem is an
    ``SfdiagError`` naming the path; on any failure (KeyboardInterrupt included) the
    temporary file is removed and the target is left as it was.
    """
    target = check_writable(path, force, what=what)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise SfdiagError(f"cannot write {what} {target}: {_reason(exc)}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _mode_for(target))
        os.replace(tmp_name, target)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise SfdiagError(f"cannot write {what} {target}: {_reason(exc)}") from exc
        raise
    return target


def _mode_for(target: Path) -> int:
    """Keep an overwritten file's permissions; give a new file the usual 0o666 & ~umask."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
