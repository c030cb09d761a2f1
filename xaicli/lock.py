"""Advisory locks on an output folder: two processes never write one run at once.

A run holds ``OUT/.xai-run.lock`` from before it looks at the folder until it has finished: an
unsharded run exclusively; each part of a sharded or torchrun run shared (the parts of one run
write disjoint files), plus its part's own lock ``OUT/.xai-part.I-of-N.lock`` exclusively (no two
processes run one part). A merge claims the part locks of the parts it merges, so it never reads,
rewrites or deletes the files of a part that is still running.

The locks are ``flock(2)`` locks: the kernel drops them when the process ends, ``kill -9``
included, so a killed run leaves no stale lock behind. An exclusive holder writes its PID, host and
start time into the lock file, for a refused process to name it; forked children (loader workers)
close their copies, so a lock never outlives its run in a straggling child. A lock whose recorded
holder is gone from this host but which is still held (a child of a killed run that has not exited
yet) is waited for a few seconds before the newcomer gives up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, documented
    fcntl = None  # type: ignore[assignment]

FOLDER_LOCK = ".xai-run.lock"
PART_LOCK_PREFIX = ".xai-part."
STALE_WAIT_S = 10.0  # how long a lock whose holder is gone is waited for


def part_lock_name(index: int, count: int) -> str:
    return f"{PART_LOCK_PREFIX}{index}-of-{count}.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written into the lock file."""

    pid: int
    host: str
    started: str
    what: str  # e.g. "xai explain", "xai explain --shard 0/2", "xai merge"

    @staticmethod
    def me(what: str) -> Holder:
        return Holder(os.getpid(), socket.gethostname(),
                      datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"), what)

    def describe(self) -> str:
        return f"PID {self.pid} on {self.host} ({self.what}, started {self.started})"

    def gone(self) -> bool:
        """True when the holder ran on this host and its process no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists, owned by someone else
            return False
        return False


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in a lock file (None when empty, unreadable or not ours)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["what"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# Descriptors of the locks this process holds; closed in forked children, which do not own them.
_held: set[int] = set()
_held_guard = threading.Lock()


def _close_in_child() -> None:
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class FileLock:
    """One flock on ``path``: shared or exclusive, never blocking (``acquire`` says whether it got it)."""

    def __init__(self, path: Path, *, shared: bool = False, what: str = "xai") -> None:
        self.path = path
        self.shared = shared
        self.what = what
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> bool:
        """Take the lock if it is free. OSError when the file cannot be created (a read-only or
        full folder: the caller turns it into a message)."""
        if fcntl is None:  # pragma: no cover
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    return True  # a file system without flock: unlocked, as documented
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was replaced after we opened it: lock the current one
        with _held_guard:
            _held.add(fd)
        self.fd = fd
        if not self.shared:
            try:
                self._write_holder()
            except OSError:
                self.release()
                raise
        return True

    def _write_holder(self) -> None:
        assert self.fd is not None
        data = (json.dumps(asdict(Holder.me(self.what))) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self, unlink: bool = False) -> None:
        """Let go of the lock; ``unlink`` (an exclusive holder only) also removes the file, which
        is safe: a process that opened it meanwhile sees it replaced and opens the new one."""
        if self.fd is None:
            return
        if unlink and not self.shared:
            with contextlib.suppress(OSError):
                self.path.unlink()
        fd, self.fd = self.fd, None
        with _held_guard:
            _held.discard(fd)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def acquire_or_wait_stale(self) -> bool:
        """``acquire``; when the recorded holder is a dead process of this host (its children are
        still exiting), retry for up to STALE_WAIT_S."""
        if self.acquire():
            return True
        holder = read_holder(self.path)
        if holder is None or not holder.gone():
            return False
        deadline = time.monotonic() + STALE_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if self.acquire():
                return True
        return False

    def holder(self) -> Holder | None:
        return read_holder(self.path)


def held_part_locks(out: Path) -> list[tuple[Path, Holder | None]]:
    """Part locks under ``out`` that some process holds now (probed without waiting)."""
    found = []
    for p in sorted(out.glob(f"{PART_LOCK_PREFIX}*.lock")):
        probe = FileLock(p, shared=True)
        try:
            got = probe.acquire()
        except OSError:
            continue
        if got:
            probe.release()
        else:
            found.append((p, read_holder(p)))
    return found


def describe_holders(holders: list[Holder | None]) -> str:
    named = [h.describe() for h in holders if h is not None]
    if not named:
        return "another process (its details are not recorded yet)"
    return "; ".join(named)
