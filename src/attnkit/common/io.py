"""Writing reports whole or not at all, with the file mode a user expects.

A report is written to a temporary file beside its target and renamed into place, so a reader
never sees half a file and an interrupted run leaves the old report (or none). Because the
rename replaces the target's inode, the mode is set explicitly: a new file gets what the umask
allows (0644 under the usual 022, as ``open(path, "w")`` would give, not ``mkstemp``'s 0600); an
existing file keeps its own mode; a symlink is written through to its target and stays a link.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path

from attnkit.errors import UserError

NEW_FILE_MODE = 0o666  # before the umask, as open() uses


def current_umask() -> int:
    """The process umask (``os.umask`` can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _real_target(path: Path) -> Path:
    """The file a write to ``path`` should change: through symlinks, so the link itself is kept."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def check_writable(path: str | os.PathLike, what: str = "report") -> None:
    """Raise ``UserError`` now if ``path`` cannot receive a report (directory, under a file, unwritable)."""
    shown = str(path)
    target = _real_target(Path(path))
    if target.is_dir():
        raise UserError(f"{what} {shown} is a directory; give a file name inside it")
    parent = target.parent
    if not parent.exists():
        ancestor = parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if ancestor.is_file():
            raise UserError(f"{what} {shown} cannot be written: {ancestor} is a file, not a directory")
        raise UserError(f"{what} {shown} cannot be written: directory {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{what} {shown} cannot be written: {parent} is a file, not a directory")
    if target.exists() and not os.access(target, os.W_OK):
        raise UserError(f"{what} {shown} cannot be written: the file is read-only (permission denied)")
    try:  # the only reliable test for a read-only filesystem or a directory we may not write in
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", dir=parent)
    except OSError as e:
        raise UserError(f"{what} {shown} cannot be written: {e.strerror or e} in {parent}") from e
    os.close(fd)
    os.unlink(probe)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all, keeping the mode and symlinks a user expects."""
    target = _real_target(Path(path))
    if not target.parent.is_dir():
        raise UserError(f"cannot write {path}: directory {target.parent} does not exist")
    if target.is_dir():
        raise UserError(f"cannot write {path}: it is a directory")
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = NEW_FILE_MODE & ~current_umask()
    payload = data if isinstance(data, bytes) else data.encode("utf-8")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(doc: dict, target: str) -> None:
    """``target`` is a path, or ``-`` for standard output."""
    text = json.dumps(doc, indent=2, allow_nan=False)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        write_atomic(target, text + "\n")
