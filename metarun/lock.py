"""Locks that end with their process: one process trains a run directory, one builds a dataset cache.

Both are flock(2) locks on a small file. The kernel drops a lock when its process ends, however it
ends (kill -9, the OOM killer, a node that lost power), so a lock left by a killed run never blocks
the next start. The holder removes the file as it lets go, and a process that waited on a file
removed meanwhile opens the new one (`Lock.acquire`), so a run directory or a cache folder holds
no lock file after a run that ended normally.

flock works on local file systems and on NFS (Linux runs it as an NFS byte-range lock; a node
that vanishes holds it until the server's lease expires, about 90 s). A file system that has no
flock at all (Lustre mounted without `flock`, some FUSE mounts) gets a one-line warning and no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from metarun.errors import MetarunError
from metarun.run_dir import lock_file, lock_holder

T = TypeVar("T")
# The errors of a file system without flock: go on unlocked (with a warning) rather than not run.
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class Lock:
    """An exclusive flock on the file `path`, created if missing and removed on `release`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, wait: bool = True) -> bool:
        """Take the lock, waiting for another holder to let go if `wait`; without `wait`, False at
        once when another process holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as e:
                if e.errno not in NO_FLOCK:
                    os.close(fd)
                    raise
                warnings.warn(
                    f"{self.path.parent} is on a file system without flock ({os.strerror(e.errno)}), so "
                    "nothing stops a second process writing there at once; start one run per directory",
                    stacklevel=2,
                )
                self.fd = fd
                return True
            # The holder we waited for may have removed the file: a lock on it would exclude no one.
            if same_file(fd, self.path):
                self.fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(
            missing_ok=True
        )  # still holding it: a waiter then sees the file gone and retries
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class RunDirBusy(MetarunError):
    """Another live process trains this run directory; nothing was written into it."""


def check_run_dir_free(run_dir: Path) -> None:
    """RunDirBusy if a live process holds `run_dir`'s lock; writes nothing (a missing lock file,
    or one left by a killed run, means the directory is free)."""
    path = lock_file(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirBusy(busy_message(run_dir)) from None
    except OSError as e:
        if e.errno not in NO_FLOCK:
            raise
    finally:
        os.close(fd)


def lock_run_dir(run_dir: Path, tries: int = 10) -> Lock:
    """The lock of `run_dir`, held until released or until this process ends, with this process's
    pid, host and start time in it; RunDirBusy if another live process holds it.

    A process that only checks the directory (`check_run_dir_free`) holds the lock for a moment:
    a few tries 50 ms apart tell it from a process that trains there."""
    lock = Lock(lock_file(run_dir))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(tries):
            if lock.acquire(wait=False):
                break
            time.sleep(0.05)
        else:
            raise RunDirBusy(busy_message(run_dir))
    except OSError as e:
        raise MetarunError(
            f"cannot make {lock.path} ({e.strerror}); free space there or choose another "
            "hydra.run.dir"
        ) from e
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    with contextlib.suppress(
        OSError
    ):  # a full disk: the lock holds all the same, and the run's next write says so
        os.ftruncate(lock.fd, 0)
        os.pwrite(lock.fd, json.dumps(holder).encode() + b"\n", 0)
    return lock


def busy_message(run_dir: Path) -> str:
    """`<run_dir> is being trained by process <pid> on <host> (started <time>); ...`, from its lock file."""
    try:
        holder = lock_holder(run_dir)
        who = f"process {holder['pid']} on {holder['host']} (started {holder['started'].replace('T', ' ')})"
        stop = f"stop it (kill {holder['pid']} on {holder['host']})"
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
    ):  # it is writing its name in just now
        who, stop = "another process", "stop it"
    return (
        f"{run_dir} is being trained by {who}; wait for it to end or {stop}, then start again to resume, "
        "or choose a new hydra.run.dir"
    )


def claim_on_rank0(run_dir: Path, processes: Any, take: Callable[[Path], T]) -> Optional[T]:
    """`take(run_dir)` (check_run_dir_free or lock_run_dir) on rank 0, which alone writes the
    directory all ranks share; its RunDirBusy raised on every rank, so that none waits for a rank
    that left. Returns what `take` returned on rank 0, None elsewhere."""
    taken, busy = None, None
    if processes.main:
        try:
            taken = take(run_dir)
        except RunDirBusy as e:
            busy = str(e)
    busy = processes.agree(busy)
    if busy is not None:
        raise RunDirBusy(busy)
    return taken


@contextlib.contextmanager
def training_lock(run_dir: Path, processes: Any) -> Iterator[None]:
    """One process trains run_dir at a time: rank 0 holds its lock for all ranks while training."""
    lock = claim_on_rank0(run_dir, processes, lock_run_dir)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
