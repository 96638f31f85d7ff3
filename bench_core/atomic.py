"""Whole-or-nothing file writes (house rule 11).

Every file the harness generates (report, README sections, CSVs, plots, checkpoints, reference
statistics, cached metrics) is written to a temporary file in the destination's folder, flushed to
disk, then renamed over the destination with ``os.replace``.  A failure at any point (disk full,
I/O error, a bug in the writer, a kill) leaves the old file exactly as it was and no temporary file
behind; a reader never sees half a file.

A storage failure (any ``OSError`` while writing) is raised as :class:`StorageError`: one exception
type, one message naming the file and the reason ("disk full"), that a command-line entry point can
print without a traceback.
"""
from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class StorageError(OSError):
    """A file could not be written (disk full, I/O error, read-only folder, ...).

    ``path`` is the file, ``errno`` and ``strerror`` the cause's (as on any OSError); ``str()`` is one
    sentence that says what failed, why, and (``hint``) how to go on.
    """

    def __init__(self, path: str | os.PathLike, cause: BaseException, *, what: str = "file", hint: str = ""):
        code = getattr(cause, "errno", None)
        reason = describe_os_error(cause)
        self.path = Path(path)
        self.message = f"cannot write {what} {self.path}: {reason}" + (f"; {hint}" if hint else "")
        super().__init__(code, getattr(cause, "strerror", None) or reason)
        self.filename = str(self.path)

    def __str__(self) -> str:
        return self.message


def describe_os_error(e: BaseException) -> str:
    """A few words for an OSError: 'disk full (ENOSPC)', 'input/output error (EIO)', ..."""
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC:
        return "disk full (ENOSPC)"
    if code == errno.EDQUOT:
        return "disk quota exceeded (EDQUOT)"
    if code:
        return f"{os.strerror(code).lower()} ({errno.errorcode.get(code, code)})"
    return f"{type(e).__name__}: {e}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; some filesystems cannot fsync a folder, which only weakens durability."""
    try:
        _fsync_path(folder)
    except OSError:
        pass


def _new_temp(path: Path) -> Path:
    """Create an empty, unique temporary file beside ``path`` (mode from the umask, like a plain open)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


@contextmanager
def atomic_path(path: str | os.PathLike, *, what: str = "file", hint: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally the temporary file is
    fsync'd and renamed over ``path``, otherwise it is removed and ``path`` is untouched.

    Writers that take a file name must be told the format explicitly (the temporary name ends in
    ``.tmp``).  An ``OSError`` (in the block, the fsync or the rename) is raised as :class:`StorageError`
    naming ``path``; ``what`` and ``hint`` go into its message.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory, expected a file", str(path))
        tmp = _new_temp(path)
    except OSError as e:
        raise StorageError(path, e, what=what, hint=hint) from e
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            raise StorageError(path, e, what=what, hint=hint) from e
        raise
    _fsync_dir(path.parent)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a short write is continued)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, what: str = "file", hint: str = "") -> Path:
    """Write ``data`` to ``path`` whole or not at all; returns ``path``."""
    path = Path(path)
    with atomic_path(path, what=what, hint=hint) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", what: str = "file",
                      hint: str = "") -> Path:
    """Write ``text`` to ``path`` whole or not at all; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding), what=what, hint=hint)
