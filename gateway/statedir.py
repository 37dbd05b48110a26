"""The state directory: one write-ahead log per running daemon, adopted after it exits.

During an upgrade handover two daemons run side by side on the same state directory, so
each writes its own log in ``<state_dir>/wal/<instance>/`` and holds an exclusive ``flock``
on it for as long as it lives. A log whose lock is free belongs to a daemon that has exited
(drained, crashed or killed); the running daemon adopts it: it re-appends the unretired
records to its own log (durably), then removes the old directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path

from gateway.errors import GatewayError

LOCK_NAME = "lock"


class StateDirError(GatewayError):
    """The state directory cannot be used."""


class InstanceDir:
    """This daemon's own WAL directory, locked while it runs."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir) / "wal"
        self.path = self.root / f"{time.time_ns() // 1000:x}-{os.getpid()}"
        self._lock_fd: int | None = None

    def claim(self) -> Path:
        try:
            self.path.mkdir(parents=True, exist_ok=False)
            fd = os.open(self.path / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as err:
            raise StateDirError(
                f"cannot use the state directory {self.root.parent}: "
                f"{err.strerror or err} ({err.filename or self.path})") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd = fd
        return self.path

    def lock_orphans(self) -> list[tuple[Path, int]]:
        """Other daemons' logs whose lock is free, oldest first, now locked by us.

        Hand each back with ``release_orphan`` once it has been adopted (or not)."""
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry != self.path and entry.is_dir():
                fd = _try_lock(entry / LOCK_NAME)
                if fd is not None:
                    found.append((entry, fd))
        return found

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None


def release_orphan(fd: int) -> None:
    os.close(fd)


def _try_lock(lock_path: Path) -> int | None:
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # its daemon is alive
    return fd



def write_atomically(path: str | Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a temp file in the same directory, fsynced, renamed
    over it, then the directory fsynced, so a reader (or a crash) sees the old file or the
    new one, never a mix; a failed write leaves no temp file. Raises OSError."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash
    finally:
        os.close(dir_fd)
