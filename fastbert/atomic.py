"""Writing files and directories so that no reader ever sees half of one: write under a temporary name beside the
target, fsync, rename into place. ``write_atomic`` takes the bytes at once, ``open_atomic`` streams them,
``replace_directory`` puts a directory built beside its target in place of it.

What ends up in place gets the permissions an ordinary new file or directory would (0o666 or 0o777 less the
umask), not the owner-only modes of ``tempfile``: shards and exported models are often read by other users.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``mode`` ``"wb"`` or ``"w"``), and rename it to ``path``
    when the block ends normally, after a flush and fsync; if the block raises, the temporary file is deleted and
    ``path`` is left as it was. Missing parent directories are created."""
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic writes a new file: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file in the same directory, then ``os.replace``)."""
    with open_atomic(path) as f:
        f.write(data)


def replace_directory(
    new: str | os.PathLike, target: str | os.PathLike, aside: str | os.PathLike | None = None
) -> None:
    """Put directory ``new`` (built beside ``target``, on the same file system) at ``target``, replacing what is
    there: a non-empty old directory is moved aside, the new one renamed in (the renames flushed to disk), then the
    old one deleted, so ``target`` always holds one of the two whole, except between the two renames, when the old
    one waits aside whole. ``aside`` names that place, for a reader that must find the old one after a crash there;
    by default it is a fresh hidden directory beside ``target``. What ``aside`` held before goes: replaced by the
    old directory, or (with no old one to move) deleted once the new one is in, since it may be the only whole copy
    until then. ``new`` gets an ordinary new directory's mode."""
    new, target = Path(new), Path(target)
    new.chmod(0o777 & ~_umask())  # mkdtemp's owner-only mode would make the files unreadable to other users
    holder = Path(aside) if aside is not None else None  # what is deleted once the new one is in
    if target.exists() and any(target.iterdir()):
        if holder is None:
            holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, holder / target.name)
        else:
            shutil.rmtree(holder, ignore_errors=True)
            os.replace(target, holder)
    os.replace(new, target)  # onto nothing, an empty directory, or the place the old one has left
    _fsync_directory(target.parent)
    if holder is not None:
        shutil.rmtree(holder, ignore_errors=True)


def _fsync_directory(path: Path) -> None:
    """Flush a directory's entries (the renames in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
