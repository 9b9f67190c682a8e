"""One run per workdir (valign_jax/workdir_lock.py): a second process on a locked workdir is
refused with a message naming the first (host, pid, start, command); after `kill -9` of the
holder the lock is free again, also while a child it forked (a grain worker) lives on. The
lease used for bucket workdirs: the same refusal, a same-host holder that died is stale at
once, one on another host after its heartbeat stops. Everything runs under timeouts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from valign_jax import workdir_lock
from valign_jax.workdir_lock import WorkdirBusyError

from conftest import REPO
from test_storage import fake_gcs  # noqa: F401  (the gs:// stand-in, a fixture)
from timeouts import no_hang

HOLDER = """
import os, sys, time
from valign_jax import workdir_lock
lock = workdir_lock.acquire(sys.argv[1], backend=sys.argv[2], heartbeat_s=0.2, stale_s=30)
if sys.argv[3] == "fork":           # a worker process that outlives its parent
    if os.fork() == 0:
        time.sleep(120)
        os._exit(0)
print("LOCKED", flush=True)
time.sleep(120)
"""


def start_holder(workdir, backend="record", fork=False):
    """A process that takes the lock, says LOCKED and sleeps; returned once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), backend,
                             "fork" if fork else "-", "--marker-arg"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    with no_hang(60):
        line = proc.stdout.readline()
    assert line.strip() == "LOCKED", proc.stderr.read()
    return proc


def kill_9(proc):
    proc.kill()   # SIGKILL: no cleanup, no finally blocks
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture
def holders():
    started = []
    yield started
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_second_run_is_refused_naming_the_first_and_kill_9_frees_the_lock(
        tmp_path, holders, caplog):
    """A holder process takes the record lock. Asserts: acquiring from this process (a second
    run) raises WorkdirBusyError (an OSError: main prints one FATAL line) naming the holder's
    pid, host, start time and command line, within the no-hang guard; after kill -9 of the
    holder, acquire succeeds at once, saying the previous run ended without releasing it;
    after release, the lock file is empty and a new acquire succeeds quietly."""
    holder = start_holder(tmp_path)
    holders.append(holder.pid)
    with no_hang(20), pytest.raises(WorkdirBusyError) as err:
        workdir_lock.acquire(tmp_path)
    message = str(err.value)
    assert isinstance(err.value, OSError)
    assert f"{tmp_path} is in use by another run: pid {holder.pid} on host " \
           f"{socket.gethostname()}, started 20" in message
    assert "--marker-arg" in message and "another --workdir" in message

    kill_9(holder)
    with no_hang(20):
        lock = workdir_lock.acquire(tmp_path)
    assert f"pid {holder.pid}" in caplog.text and "ended without releasing it" in caplog.text
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / "run.lock").read_text() == ""
    caplog.clear()
    with workdir_lock.acquire(tmp_path):
        assert "without releasing" not in caplog.text


def test_a_forked_child_that_outlives_its_killed_parent_does_not_keep_the_lock(
        tmp_path, holders):
    """The holder forks a child (as grain's worker processes are) and is killed with
    SIGKILL; the child lives on. Asserts: the child is alive and the lock is free."""
    holder = start_holder(tmp_path, fork=True)
    holders.append(holder.pid)
    children = subprocess.run(["pgrep", "-P", str(holder.pid)], capture_output=True,
                              text=True).stdout.split()
    assert len(children) == 1
    holders.append(int(children[0]))
    kill_9(holder)
    os.kill(int(children[0]), 0)   # still alive
    with no_hang(20), workdir_lock.acquire(tmp_path) as lock:
        assert lock.backend == "record"


def test_one_process_cannot_take_its_own_lock_twice(tmp_path):
    """POSIX record locks never conflict within one process, so the module refuses the second
    acquire itself (and a second open/close of the file would drop the first lock)."""
    with workdir_lock.acquire(tmp_path):
        with pytest.raises(WorkdirBusyError, match="already locked by this process"):
            workdir_lock.acquire(tmp_path)
    workdir_lock.acquire(tmp_path).release()


def test_the_lease_refuses_a_second_run_and_a_dead_holder_on_this_host_is_stale_at_once(
        tmp_path, holders):
    """backend="lease" (what gs:// workdirs use), heartbeat every 0.2 s, stale after 30 s.
    Asserts: a second run is refused naming the holder and its last heartbeat; the holder's
    heartbeat moves on; after kill -9 the lock is taken over at once (same host, process
    gone) although its heartbeat is fresh; release removes the lease file."""
    holder = start_holder(tmp_path, backend="lease")
    holders.append(holder.pid)
    with pytest.raises(WorkdirBusyError, match=rf"(?s)pid {holder.pid} on host .* \(its last "
                                               rf"heartbeat was \d+ s ago"):
        workdir_lock.acquire(tmp_path, backend="lease", stale_s=30)
    first = json.loads((tmp_path / "run.lock").read_text())["heartbeat"]
    time.sleep(0.6)
    assert json.loads((tmp_path / "run.lock").read_text())["heartbeat"] > first

    kill_9(holder)
    lock = workdir_lock.acquire(tmp_path, backend="lease", heartbeat_s=0.2, stale_s=30)
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_a_lease_from_another_host_is_taken_over_only_after_its_heartbeat_stops(
        tmp_path, caplog):
    """A lease written by a run on another host (its liveness cannot be asked): refused while
    its heartbeat is younger than stale_s, taken over with a warning once older."""
    other = {"host": "other-host", "pid": 4242, "pid_start": 1, "command": "python -m x",
             "started": "2025-01-01T00:00:00+00:00", "heartbeat": time.time()}
    (tmp_path / "run.lock").write_text(json.dumps(other))
    with pytest.raises(WorkdirBusyError, match="pid 4242 on host other-host"):
        workdir_lock.acquire(tmp_path, backend="lease", heartbeat_s=0.2, stale_s=60)
    (tmp_path / "run.lock").write_text(json.dumps({**other, "heartbeat": time.time() - 61}))
    with workdir_lock.acquire(tmp_path, backend="lease", heartbeat_s=0.2, stale_s=60):
        assert "no heartbeat for 61 s" in caplog.text and "other-host" in caplog.text


def test_bucket_workdirs_take_a_lease(fake_gcs):
    """A gs:// workdir (served from a local directory by etils' epath mock) gets a lease
    through epath, written into the bucket and removed on release."""
    lock = workdir_lock.acquire("gs://bucket/run", heartbeat_s=0.2)
    assert lock.backend == "lease"
    assert json.loads((fake_gcs / "bucket/run/run.lock").read_text())["pid"] == os.getpid()
    with pytest.raises(WorkdirBusyError, match="already locked by this process"):
        workdir_lock.acquire("gs://bucket/run")
    lock.release()
    assert not (fake_gcs / "bucket/run/run.lock").exists()


JOB_PROCESS = """
import sys
from valign_jax import sharding, workdir_lock
sharding.initialize_distributed()
try:
    lock = workdir_lock.acquire_for_run(sys.argv[1])
except workdir_lock.WorkdirBusyError as err:
    print("BUSY", err, flush=True)
    sys.exit(1)
print("ACQUIRED", lock is not None, flush=True)
"""


def test_a_two_process_job_stops_on_both_processes_when_the_workdir_is_busy(tmp_path, holders):
    """Two jax.distributed processes (CPU, gloo) call acquire_for_run on a workdir another run
    holds: process 0 is refused naming the holder, process 1 learns it from process 0, both
    exit 1. Once the holder is gone, the same job takes the lock on process 0 only."""
    import socket as sockets
    holder = start_holder(tmp_path)
    holders.append(holder.pid)

    def job():
        with sockets.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen(
            [sys.executable, "-c", JOB_PROCESS, str(tmp_path)], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
                 "VALIGN_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                 "VALIGN_NUM_PROCESSES": "2", "VALIGN_PROCESS_ID": str(i)}) for i in range(2)]
        results = [(p.wait(timeout=180), p.stdout.read()) for p in procs]
        return [(code, next((line for line in out.splitlines()   # gloo prints there too
                             if line.startswith(("BUSY", "ACQUIRED"))), out))
                for code, out in results]

    (code0, out0), (code1, out1) = job()
    assert (code0, code1) == (1, 1), (out0, out1)
    assert out0.startswith("BUSY") and f"pid {holder.pid}" in out0
    assert out1.startswith("BUSY") and "process 0's log names it" in out1
    kill_9(holder)
    assert job() == [(0, "ACQUIRED True"), (0, "ACQUIRED False")]
