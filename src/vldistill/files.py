"""Writing files: atomically, with the user's umask, and with an error that names the file when the disk is full.

Every file vldistill writes follows the user's umask, as a file made with ``open`` does. ``safetensors``'
``save_file`` (and so ``transformers``' ``save_pretrained``) creates its files with mode 0600 whatever the umask,
so a serving account could not read an exported student: :func:`save_safetensors` serialises in memory and writes
the bytes itself, and :func:`follow_umask` gives the files of a directory written by ``save_pretrained`` the mode
the umask allows.

A full disk shows up as ``OSError(ENOSPC)`` from ``write``, but also as ``RuntimeError: ... unexpected pos``
(``torch.save``) or a ``SafetensorError`` naming no file; :func:`disk_errors` turns each into one
``OSError(ENOSPC, "no space left on device while writing PATH")``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save as _safetensors_bytes

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask (read by setting it and putting it back, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666`` less the umask."""
    return 0o666 & ~umask()


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every file under a directory) the mode a new file gets under the umask."""
    path, mode = Path(path), file_mode()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for file in files:
        os.chmod(file, mode)


def is_disk_full(err: BaseException) -> bool:
    """Whether an exception says the disk (or quota) is full, in any of the forms the writers raise it."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text or "unexpected pos" in text


class DiskFullError(OSError):
    """``OSError(ENOSPC)`` whose message names the file that could not be written."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path}")
        self.path = str(path)

    def __str__(self) -> str:
        return f"no space left on device while writing {self.path}"

    def __reduce__(self):
        return DiskFullError, (self.path,)


@contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full-disk error raised inside the block into a :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise DiskFullError(path) from err
        raise


def write_bytes(path: str | os.PathLike, data: bytes | memoryview, tmp: str | os.PathLike | None = None) -> str:
    """Write ``data`` to ``path`` atomically (a temporary file in the same directory, synced, then renamed) with the
    umask's mode; returns the SHA-256 of the data. A full disk raises :class:`DiskFullError` naming the file and
    leaves ``path`` as it was.

    Args:
        path: the file to write.
        data: its content.
        tmp: the temporary name (default ``path`` + ``.tmp``); a reader that lists the directory should skip it.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    view = memoryview(data)
    with disk_errors(path):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies, as with open()
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)
    return hashlib.sha256(view).hexdigest()


def write_text(path: str | os.PathLike, text: str, tmp: str | os.PathLike | None = None) -> None:
    """:func:`write_bytes` for UTF-8 text."""
    write_bytes(path, text.encode("utf-8"), tmp)


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    tmp: str | os.PathLike | None = None,
) -> str:
    """``safetensors.torch.save_file``, but atomic and with the umask's mode; returns the file's SHA-256."""
    with disk_errors(path):
        data = _safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    return write_bytes(path, data, tmp)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


__all__ = [
    "DiskFullError",
    "disk_errors",
    "file_mode",
    "file_sha256",
    "follow_umask",
    "is_disk_full",
    "save_safetensors",
    "umask",
    "write_bytes",
    "write_text",
]
