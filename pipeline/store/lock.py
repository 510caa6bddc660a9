"""The cache lock: one extraction writes a cache at a time.

The lock is a file created atomically *with its content* (holder pid, host, rank, start time):
the content is written to a private temp file that is then hard-linked to the lock name, which
fails if the lock exists. Hard links are atomic on local disks and on NFS, Lustre and GPFS, so
two nodes sharing a cache folder cannot both take the lock, and a holder killed at any moment
never leaves an empty lock behind. Where hard links are not supported the lock falls back to
``O_CREAT | O_EXCL``.

A lock whose holder ran on this host and whose process is gone is stale and taken over: it is
deleted only by the one process that claims it (an exclusive claim file named after the stale
lock's content) and only if it still holds that content, then the lock is created as above. So
two processes that both find a dead holder never both end up holding the lock. A lock held from
another host cannot be checked; the error says which host and pid hold it and how to clear it
once that process is known to be dead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from .errors import CacheError

LOCK = ".lock"
ATTEMPTS = 50  # tries to take the lock while stale locks are taken over
RETRY_S = 0.02  # pause while another process takes a stale lock over


class LockError(CacheError):
    """The lock is held by another live extraction."""


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create_exclusive(path: Path, content: str) -> bool:
    """Create ``path`` holding ``content`` unless it exists; True when created."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.tmp{os.getpid()}")
    tmp.write_text(content)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        return _create_o_excl(path, content)
    finally:
        tmp.unlink(missing_ok=True)


def _create_o_excl(path: Path, content: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(content)
    return True


def _read(path: Path) -> str:
    """The text of ``path`` ("" when it vanished or is unreadable)."""
    try:
        return path.read_text()
    except OSError:
        return ""


def _parse(content: str) -> dict:
    """The holder recorded in a lock file's text ({} when empty or unreadable)."""
    try:
        return json.loads(content or "{}")
    except json.JSONDecodeError:
        return {}


def _dead_here(holder: dict, host: str) -> bool:
    """Whether ``holder`` ran on ``host`` and its process is gone."""
    return holder.get("host") == host and not pid_alive(int(holder.get("pid", -1)))


def _remove_if_unchanged(path: Path, content: str, me: dict) -> bool:
    """Delete ``path`` if it still holds ``content`` (a dead holder's); False while another
    process does this.

    Takeovers of one stale file are serialised by a claim file named after its content, created
    exclusively: only the claimant deletes, and only after re-reading the content under the
    claim, so a slow process can never delete the fresh lock of the process that took over
    first. A claim left by a claimant that died is itself stale and removed the same way.
    """
    digest = hashlib.sha256(content.encode()).hexdigest()[:16]
    claim = path.with_name(f"{path.name}.takeover-{digest}")
    if not _create_exclusive(claim, json.dumps({**me, "started": time.time()})):
        claimed = _read(claim)
        if claimed and _dead_here(_parse(claimed), me["host"]):
            _remove_if_unchanged(claim, claimed, me)
        return False
    try:
        if _read(path) == content:
            path.unlink(missing_ok=True)
    finally:
        claim.unlink(missing_ok=True)
    return True


class CacheLock:
    """An exclusive lock file in a cache folder; a stale lock (dead holder) is taken over."""

    def __init__(self, root: Path | str, rank: int = 0):
        self.path = Path(root) / LOCK
        self.rank = rank
        self.held = False
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "rank": rank}

    def acquire(self) -> "CacheLock":
        """Take the lock or raise :class:`LockError` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = json.dumps({**self.me, "started": time.time()})
        for _ in range(ATTEMPTS):
            if _create_exclusive(self.path, mine):
                self.held = True
                return self
            content = _read(self.path)
            holder = _parse(content)
            if not self.stale(holder):
                raise LockError(self._held_message(holder))
            if content and not _remove_if_unchanged(self.path, content, self.me):
                time.sleep(RETRY_S)  # another process is taking the stale lock over
        raise LockError(f"could not take the lock {self.path}: it keeps reappearing")

    def holder(self) -> dict:
        """The holder recorded in the lock file ({} when it vanished or is unreadable)."""
        return _parse(_read(self.path))

    def stale(self, holder: dict) -> bool:
        """Whether ``holder`` is known dead: it ran on this host and its process is gone."""
        if not holder:  # vanished between our attempt and the read: try again
            return not self.path.exists()
        return _dead_here(holder, self.me["host"])

    def _held_message(self, holder: dict) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return (f"another extraction is writing {self.path.parent} (pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {started}). Wait for it to finish; if that "
                f"process is gone, delete {self.path} and run again.")

    def release(self) -> None:
        """Remove the lock if this object holds it (never someone else's)."""
        if self.held:
            holder = self.holder()
            if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "CacheLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK", "CacheLock", "LockError", "pid_alive"]
