"""One writer per directory: an advisory `fcntl.flock` on `<dir>/.writer.lock`, which records its holder.

A run dir is locked by rank 0 of `train`, a replay store by rank 0 of `collect` (`held_by_rank0`), for the
whole command, so a
second command on the same directory is refused at once, naming the holder (pid, host, start time). The
kernel drops a flock when its process dies, so a lock file whose lock is free but whose record names a
holder is what a killed run left: it is taken over with a message. A lock still held by a process that is
gone (this host only: a forked child inherited it) is taken over too, by replacing the lock file.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from replay_megatron.platform.launch_env import read_launch_env

F = TypeVar("F", bound=Callable[..., Any])

LOCK_NAME = ".writer.lock"


class DirectoryLocked(RuntimeError):
    """Another live process writes this directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('command')}, started "
            f"{holder.get('started')})")


class WriterLock:
    """The lock of one directory; `acquire` refuses or takes over (see the module doc), `release` frees it."""

    def __init__(self, directory: str | os.PathLike, command: str) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def _read_holder(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            return {"pid": None, "host": None, "command": f"unreadable record {raw[:80]!r}", "started": None}

    def acquire(self) -> None:
        """Take the lock, or raise DirectoryLocked naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after replacing a lock file left held by a dead process
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_holder(fd)
                os.close(fd)
                if holder.get("host") == socket.gethostname() and holder.get("pid") and \
                        not _pid_alive(int(holder["pid"])):
                    print(f"[lock] {self.path}: held by {_describe(holder)}, which is gone; taking it over",
                          flush=True)
                    self.path.unlink(missing_ok=True)
                    continue
                raise DirectoryLocked(f"{self.path.parent} is in use by {_describe(holder)}: one {self.command} "
                                      f"at a time (lock file {self.path})") from None
            holder = self._read_holder(fd)
            if holder:
                print(f"[lock] {self.path}: taking over the stale lock of {_describe(holder)} (its lock is free: "
                      "that process ended without releasing it)", flush=True)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return
        raise DirectoryLocked(f"{self.path}: could not take over the lock of a dead process")

    def release(self) -> None:
        """Empty the record (a clean release is not 'stale') and drop the lock; the file stays (see acquire)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def writer_lock(directory: str | os.PathLike, command: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of `directory` for the block (`enabled=False`: do nothing, e.g. on ranks other than 0)."""
    if not enabled:
        yield
        return
    lock = WriterLock(directory, command)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def held_by_rank0(directory_of: Callable[[Any], str | os.PathLike | None], command: str) -> Callable[[F], F]:
    """Decorate a command `fn(cfg, ...)`: rank 0 of the job holds the lock of `directory_of(cfg)` (None: no
    lock) while it runs; the other ranks do not touch it."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(cfg, *args, **kwargs):
            directory = directory_of(cfg)
            with writer_lock(directory, command, enabled=directory is not None and read_launch_env().rank == 0):
                return fn(cfg, *args, **kwargs)
        return run  # type: ignore[return-value]
    return decorate
