"""Writes that survive a kill, a crash or a full disk.

Every file rewardkit writes whole goes through `atomic_write`: it is written
under a temporary name beside its destination, flushed to disk, and renamed
over it, so a reader (or a resumed run) sees the old file or the new one,
never half of one. A write the machine refuses (no space left, a file-size
limit, an I/O error) removes the temporary file and raises `WriteFailed`
naming what was being written; what was there before is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from safetensors import SafetensorError

from rewardkit.errors import UserError, WriteFailed

# What a refused write raises: the OS's error (torch.save and PIL write through Python's files); safetensors'
# SafetensorError (an IoError inside). Not RuntimeError: a bug in what is being written is not a full disk.
WRITE_ERRORS = (OSError, SafetensorError)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk. A folder's flush is skipped where the platform has none
    (Windows cannot open a folder; some network and FUSE filesystems refuse it with EINVAL)."""
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (path.is_dir() and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def failure(exc: BaseException) -> str:
    """A refused write's cause in one line: 'No space left on device', 'File too large', ..."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


@contextlib.contextmanager
def atomic_write(path: Path, what: str | None = None):
    """Yield a temporary path to write `path`'s new content to; on success it is flushed and renamed over
    `path` (and the folder's entry flushed), on any failure removed. `what` names the file in a WriteFailed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")  # the same suffix: writers that pick a format by it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, WRITE_ERRORS):
            raise WriteFailed(f"writing {what or path} failed: {failure(exc)}") from exc
        raise


def write_text_atomic(path: Path, text: str, what: str | None = None) -> None:
    """Write a whole text file so a reader sees the old text or the new, never half of it."""
    with atomic_write(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")


def writable_dir(path: Path, what: str) -> Path:
    """Create folder `path` (an output's) and make sure a file can be written in it, before any work that
    would be lost: UserError naming `what` (e.g. '--out') otherwise."""
    import tempfile

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; give a folder (a new one is created)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be written ({exc.strerror or exc}); give another folder") from None
    return path


def writable_file(path: Path, what: str) -> Path:
    """The same for an output file: its folder is created and writable, and it is not itself a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give the file to write")
    writable_dir(path.parent, f"{what}'s folder")
    return path
