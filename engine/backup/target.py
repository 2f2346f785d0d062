"""Where an archive lives: a small interface, and the folder that implements it.

Theory of operation
-------------------
The archiver and restore need only named objects, written whole and never changed in place:

* `list(prefix)`: the names under a prefix, sorted;
* `read(name)`: an object's bytes (`BackupCorrupt` if it is missing: a name the archive refers
  to must be there);
* `write(name, data)`: store an object whole; durable once it returns (a crash leaves the old
  object, or none, never a part);
* `create(name, data)`: the same, but only if no object of that name exists; False if one does.
  This is the one atomic step the archive needs: manifest versions are created this way, so two
  archivers (an old writer not yet stopped and the new one) can never both write version N,
  and the loser re-reads and yields to the newer epoch;
* `delete(name)`: remove (missing is fine).

`FolderTarget` (the default: `--backup DIR`) maps names to files: `write` through
`engine.files.atomic_write` (temporary file, fsync, rename, fsync of the folder), `create` by
writing a temporary file, fsyncing it and `os.link`-ing it to the name (link fails if the name
exists, so the object appears whole or not at all). An object store implements the same five
calls (README, "Backups and restore": S3 needs conditional puts for `create`, If-None-Match).
"""

from __future__ import annotations

import abc
import os
import uuid

from engine.errors import BackupCorrupt, BackupError
from engine.files import TMP_SUFFIX, atomic_write, fsync_folder


class BackupTarget(abc.ABC):
    """The objects of one archive (see the module docstring)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where it is, for messages."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names under `prefix` ("segments/", ...), sorted."""

    @abc.abstractmethod
    def read(self, name: str) -> bytes:
        """The object's bytes; BackupCorrupt if it does not exist."""

    @abc.abstractmethod
    def write(self, name: str, data: bytes) -> None:
        """Store `data` as `name` (replacing it), whole and durably."""

    @abc.abstractmethod
    def create(self, name: str, data: bytes) -> bool:
        """Store `data` as `name` only if no such object exists; False if one does."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove `name`; a missing one is fine."""


class FolderTarget(BackupTarget):
    """An archive in a local (or mounted) folder."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = os.path.abspath(os.fspath(folder))
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise BackupError(f"backup target {self.folder} is a file, not a folder")

    def describe(self) -> str:
        return self.folder

    def _path(self, name: str) -> str:
        parts = name.split("/")
        assert name and all(p and p not in (".", "..") for p in parts), name
        return os.path.join(self.folder, *parts)

    def list(self, prefix: str) -> list[str]:
        assert prefix.endswith("/"), prefix
        try:
            names = os.listdir(self._path(prefix.rstrip("/")))
        except FileNotFoundError:
            return []
        return sorted(prefix + n for n in names if not n.endswith(TMP_SUFFIX) and ".tmp-" not in n)

    def read(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise BackupCorrupt(f"backup file {name} is missing from {self.folder}") from None

    def write(self, name: str, data: bytes) -> None:
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, data)

    def create(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
            fsync_folder(folder)

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass


def target_of(where) -> BackupTarget:
    """A target from what a caller gave: a BackupTarget, or a folder's path."""
    if isinstance(where, BackupTarget):
        return where
    if isinstance(where, (str, os.PathLike)):
        return FolderTarget(where)
    raise BackupError(f"a backup target is a folder path or a BackupTarget, not {type(where).__name__}")
