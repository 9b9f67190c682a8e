"""One run per workdir: a lock a run takes when it starts and that goes away when it ends, even
by `kill -9`.

    lock = workdir_lock.acquire(workdir)       # WorkdirBusyError naming the run holding it
    try:
        ...                                    # train
    finally:
        lock.release()
    # or: with workdir_lock.acquire(workdir): ...
    # several processes (jax.distributed): lock = workdir_lock.acquire_for_run(workdir)

Two runs in one workdir interleave metrics.jsonl, overwrite each other's config and checkpoints
and crash each other's saves. The lock file `<workdir>/run.lock` holds who has it (host, pid,
start time, command line), which the refusal of a second run names.

How a dead holder is recognised, by where the workdir is:

- A local or network file system: a POSIX record lock (fcntl.lockf) on run.lock. The kernel
  releases it when the holding process ends, however it ends, so a lock left by a killed run is
  simply free. Such locks belong to the process, not to children it forked: grain worker
  processes that outlive a killed run do not keep the workdir locked. On NFS the server's lock
  manager holds them for the host: a crashed client's locks go when its NFSv4 lease expires
  (about 90 s) or when it reboots (NFSv3). One rule of POSIX locks: closing any descriptor of
  the file in the holding process drops the lock, so this module opens run.lock once per
  process and refuses a second acquire in the same process.
- A bucket (gs://...), or a file system that refuses record locks: a lease. run.lock is
  written with the holder and a heartbeat time that a background thread renews every
  `heartbeat_s` seconds. Another run waits out `stale_s` seconds without a heartbeat before
  taking it over, except that a holder on the same host whose process no longer exists is
  stale at once. Buckets have no atomic "create if absent" through epath: two runs starting
  within the same second could both write run.lock; each reads it back after a pause and only
  the one whose record is there goes on (the other is refused). A lease is best effort; the
  record lock is exact.

Multi-host runs: only process 0 takes the lock (acquire_for_run), the others learn from it
whether the run may go on, so a second job on the same workdir stops on every host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from datetime import datetime, timezone

from valign_jax import storage

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_S, STALE_S = 30.0, 120.0
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HELD_HERE: dict[str, "WorkdirLock"] = {}   # lock files this process holds (see the docstring)


class WorkdirBusyError(OSError):
    """Another run holds the workdir; the message names it (host, pid, start, command)."""


def this_holder() -> dict:
    command = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(
        os.getpid()), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(command)}


def describe(holder: dict | None) -> str:
    if not holder:
        return "a run that has not written its details yet"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')}, command: {holder.get('command')}")


class WorkdirLock:
    """A held lock (from `acquire`). `release` is idempotent; a context manager releases it."""

    def __init__(self, path, backend: str, fd: int | None = None):
        self.path, self.backend, self._fd = path, backend, fd
        self.holder = this_holder()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def release(self) -> None:
        if _HELD_HERE.get(str(self.path)) is not self:
            return
        del _HELD_HERE[str(self.path)]
        if self.backend == "record":
            os.ftruncate(self._fd, 0)     # no stale details for the next reader
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if _identity(_read_lease(self.path)) == _identity(self.holder):
            self.path.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    # The lease: a heartbeat renewed in the background ------------------------------------

    def _write_lease(self) -> None:
        self.holder["heartbeat"] = time.time()
        tmp = self.path.parent / (self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.holder))
        tmp.replace(self.path)

    def _renew(self, every: float) -> None:
        while not self._stop.wait(every):
            current = _read_lease(self.path)
            if current is not None and _identity(current) != _identity(self.holder):
                log.error("%s was taken over by %s (no heartbeat for too long?); two runs may "
                          "now share the workdir", self.path, describe(current))
                return
            try:
                self._write_lease()
            except OSError as err:  # a bucket hiccup: the next beat tries again
                log.warning("could not renew %s: %s", self.path, err)


def acquire(workdir, *, backend: str = "auto", heartbeat_s: float = HEARTBEAT_S,
            stale_s: float = STALE_S) -> WorkdirLock:
    """Take the workdir's lock or raise WorkdirBusyError naming its holder. backend: "record"
    (fcntl.lockf), "lease" (heartbeat file) or "auto" (record locks for local paths, falling
    back to a lease where the file system refuses them; a lease for URLs)."""
    directory = storage.path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    held = _HELD_HERE.get(str(path))
    if held is not None:
        raise WorkdirBusyError(f"{workdir} is already locked by this process "
                               f"({describe(held.holder)})")
    if backend == "auto":
        backend = "lease" if storage.is_url(directory) else "record"
    if backend == "record":
        try:
            lock = _acquire_record(path, workdir)
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
            log.warning("%s: the file system refuses record locks (%s); using a lease with "
                        "a heartbeat instead", path, err)
            lock = _acquire_lease(path, workdir, heartbeat_s, stale_s)
    else:
        lock = _acquire_lease(path, workdir, heartbeat_s, stale_s)
    _HELD_HERE[str(path)] = lock
    return lock


def acquire_for_run(workdir, **options) -> WorkdirLock | None:
    """`acquire` for a (possibly multi-process) jax run: process 0 takes the lock and tells
    the others; every process raises WorkdirBusyError when the workdir is busy. Every process
    must call it (a collective). Returns the lock on process 0, None elsewhere."""
    import jax
    if jax.process_count() == 1:
        return acquire(workdir, **options)
    import numpy as np
    from jax.experimental import multihost_utils
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = acquire(workdir, **options)
        except OSError as err:
            error = err
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
        raise error
    if not ok:
        raise WorkdirBusyError(f"{workdir} is locked by another run (process 0's log names it)")
    return lock


# ---------------------------------------------------------------------------------------------


def _acquire_record(path, workdir) -> WorkdirLock:
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise
        holder = _parse(os.pread(fd, 1 << 16, 0))
        os.close(fd)
        raise WorkdirBusyError(_busy_message(workdir, holder)) from None
    previous = _parse(os.pread(fd, 1 << 16, 0))
    if previous:
        log.warning("%s: the previous run (%s) ended without releasing it (killed?); taking "
                    "it over", path, describe(previous))
    lock = WorkdirLock(path, "record", fd)
    data = json.dumps(lock.holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    return lock


def _acquire_lease(path, workdir, heartbeat_s: float, stale_s: float) -> WorkdirLock:
    current = _read_lease(path)
    if current is not None:
        age = time.time() - float(current.get("heartbeat", 0))
        dead = _dead_here(current)
        if age < stale_s and not dead:
            raise WorkdirBusyError(_busy_message(workdir, current, (
                f"its last heartbeat was {age:.0f} s ago; a lease without one for "
                f"{stale_s:.0f} s is taken over")))
        log.warning("%s: the previous run (%s) is gone (%s); taking it over", path,
                    describe(current), "its process no longer exists" if dead else
                    f"no heartbeat for {age:.0f} s")
    lock = WorkdirLock(path, "lease")
    lock._write_lease()
    time.sleep(min(1.0, heartbeat_s))   # a run starting at the same moment writes by then
    current = _read_lease(path)
    if _identity(current) != _identity(lock.holder):
        raise WorkdirBusyError(_busy_message(workdir, current,
                                             "both runs started at the same moment; it won"))
    lock._heartbeat = threading.Thread(target=lock._renew, args=(heartbeat_s,), daemon=True,
                                       name="workdir-lock-heartbeat")
    lock._heartbeat.start()
    return lock


def _identity(holder: dict | None) -> tuple:
    holder = holder or {}
    return tuple(holder.get(k) for k in ("host", "pid", "pid_start", "started"))


def _busy_message(workdir, holder, note: str = "") -> str:
    note = f" ({note})" if note else ""
    return (f"{workdir} is in use by another run: {describe(holder)}{note}. Two runs in one "
            f"workdir overwrite each other's checkpoints and metrics: wait for it to end, stop "
            f"it, or pass another --workdir")


def _parse(data: bytes) -> dict | None:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _read_lease(path) -> dict | None:
    try:
        return _parse(path.read_bytes())
    except (FileNotFoundError, OSError):
        return None


def _dead_here(holder: dict) -> bool:
    """Whether the holder ran on this host and its process is gone (or its pid now belongs
    to another process, seen by a different start time)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _process_start(pid)
    return start is not None and holder.get("pid_start") not in (None, start)


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None
