"""Small files that must survive a crash whole: one atomic, durable replace.

Theory of operation
-------------------
`atomic_write(path, data)` replaces the file at `path` by `data` so that after a crash at any
moment the file holds either the old bytes or the new ones, never a mix, and once the call
returns the new bytes are what a reboot finds:

1. write `data` to `path + ".tmp"` in the same folder (a rename is atomic only within one
   filesystem) and fsync it, so the bytes are on disk before any name points at them;
2. `os.replace` it over `path` (atomic: a reader sees the old file or the new one);
3. fsync the folder. The rename is a change of the folder, and it is not durable until the
   folder is: without this step a crash right after the call can bring back the old file, or
   (for a new file) no file at all, although the call had returned.

If writing or fsyncing the temporary file fails, it is removed (best effort) and `path` is left
as it was. The temporary name is fixed, so writers of one path must be serialized by the
caller (every caller holds that folder's lock); a stale `.tmp` left by a crash is overwritten by
the next write and never read.

Rules of this module: standard library only; it knows nothing of volumes, nodes or manifests.
"""

from __future__ import annotations

import os

TMP_SUFFIX = ".tmp"


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the folder's entries (a rename, a new or removed file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Replace the file at `path` by `data`, atomically and durably (see the module docstring).
    The folder must exist. With `mode` (say 0o600 for a file of secrets) the new file has exactly
    that mode before any byte is written to it, so it is never readable by others, not even for
    a moment; without it the file is created 0666 less the umask."""
    assert isinstance(data, (bytes, bytearray, memoryview)), type(data)
    path = os.fspath(path)
    tmp = path + TMP_SUFFIX
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666 if mode is None else mode)
    try:
        try:
            if mode is not None:  # a stale .tmp of a crash keeps its old mode through O_CREAT
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:  # os.write may write less than it was given
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.replace(tmp, path)
    fsync_folder(os.path.dirname(os.path.abspath(path)))
