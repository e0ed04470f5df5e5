"""Local object storage under `$GRAFT_HOME/storage`.

Every write goes to a temporary file in the same filesystem, is fsynced, then renamed into place:
a reader sees either the whole file or none, and a crash leaves at most a stray `.part` in tmp/.
Several workers share this directory (a volume) when the service runs as a cluster.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from graft.errors import MissingInput

log = logging.getLogger("graft.storage")


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The absolute path of a storage key; keys never leave the storage root."""
        candidate = (self.root / key).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise ValueError(f"storage key escapes the storage root: {key!r}")
        return candidate

    def new_temp_path(self, suffix: str = ".part") -> Path:
        return self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"

    def commit(self, temp_path: Path, key: str) -> Path:
        """Atomically move a finished temporary file to its key."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        _fsync_file(temp_path)
        os.replace(temp_path, target)
        _fsync_dir(target.parent)
        return target

    @contextmanager
    def atomic_path(self, key: str, suffix: str = ".part") -> Iterator[Path]:
        """Yield a temporary path to write; on success it becomes `key`, on failure it is removed."""
        temp = self.new_temp_path(suffix)
        try:
            yield temp
            self.commit(temp, key)
        finally:
            temp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_tree(self, key: str) -> None:
        shutil.rmtree(self.path(key), ignore_errors=True)

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def existing(self, key: str, what: str) -> Path:
        """The path of a stored file that must be there (`what` names it for people: "the weights file of
        model mdl_..."); MissingInput when it is not, logged with its key for the operator."""
        path = self.path(key)
        if not path.is_file():
            log.error("stored file missing: %s (%s)", key, what)
            raise MissingInput(
                f"{what} is missing from the service's storage; it cannot be used until the operator restores "
                "it (the missing key is in the service's log)"
            )
        return path


def is_disk_full(exc: BaseException) -> bool:
    """No space left on the storage volume (or the quota is spent). Writers that are not Python's (the
    safetensors serialiser) report the OS error in their message."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return f"(os error {errno.ENOSPC})" in text or f"(os error {errno.EDQUOT})" in text


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
