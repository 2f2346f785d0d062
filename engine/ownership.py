"""One owner per folder: an OS lock held for as long as a volume or node folder is open.

Theory of operation
-------------------
LMDB lets several processes open one environment, and nothing in Sixfold's protocol can fence a
second writer that shares the first one's files (both would believe they hold epoch N). So every
folder that holds Sixfold data has exactly one owner: whoever opens it takes an exclusive
`flock` on `FOLDER/LOCK` and keeps the file open until it closes the folder. The kernel releases
the lock when the owner exits, however it exits (SIGKILL included), so a crash never leaves a
stale lock behind, and no pid file has to be trusted for correctness: the pid written into the
file only names the holder in the error a second open gets.

`flock` locks belong to an open file description, so a second open from the *same* process is
refused too (it opens the file again and gets a new description).

Rules of this module: standard library only; it knows nothing of volumes or nodes.
"""

from __future__ import annotations

import errno
import fcntl
import os

from engine.errors import FolderInUse

LOCK_FILE = "LOCK"


class FolderLock:
    """An exclusive lock on one folder, held until `release()` (or the process ends)."""

    def __init__(self, folder: str, what: str) -> None:
        self.folder = os.path.abspath(folder)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock or raise FolderInUse naming the holder; changes nothing on failure."""
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            pid = holder_pid(self.folder)
            who = f"process {pid}" if pid is not None else "another process"
            if pid == os.getpid():
                who = f"this process ({pid}), through another open"
            raise FolderInUse(
                f"{self.what} {self.folder} is in use by {who}; a folder has one owner at a time. "
                "Close the other open (or stop that process) first.",
                folder=self.folder,
                holder_pid=pid,
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the description drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None


def holder_pid(folder: str) -> int | None:
    """The pid written by the folder's current (or last) owner, if readable."""
    try:
        with open(os.path.join(folder, LOCK_FILE)) as fh:
            return int(fh.read().strip() or "x")
    except (OSError, ValueError):
        return None


def hold(folder: str, what: str) -> FolderLock:
    """Lock `folder` for this open; `what` names it in errors ("embedded volume", "node folder")."""
    return FolderLock(folder, what).acquire()
