"""A run told to stop (SIGTERM from a scheduler, Ctrl-C) saves the step it is at and exits; the
rerun ends where an uninterrupted run does, bit for bit. Worker processes never outlive the run.

The run is reliability_helpers' 12-step clip demo; the signals are real, sent to the child
running `python -m valign_jax.main` once its log shows training under way.
"""

import os
import signal
import subprocess
import time

import psutil
import pytest

import valign_jax
from valign_jax import train

from conftest import REPO
from reliability_helpers import assert_trees_equal, child_env, main_command, run_config, run_main


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train.train_and_evaluate(run_config(log_every=1), workdir)
    return workdir


def start_run(workdir, log_path, **changes):
    log = open(log_path, "w")
    child = subprocess.Popen(main_command(workdir, log_every=1, **changes), cwd=REPO,
                             env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    return child, log


def wait_for(log_path, text: str, child, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log_path.read_text():
            return
        if child.poll() is not None:
            raise AssertionError(f"the run ended before {text!r}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_step_and_the_rerun_is_bit_exact(uninterrupted, tmp_path, signum):
    """The signal arrives after step 3's log line: the run logs one line naming the signal,
    exits 128 + signal with a checkpoint of the step it stopped at, and the same command again
    finishes the run with the uninterrupted run's parameters, bit for bit."""
    workdir, log_path = tmp_path / "run", tmp_path / "log"
    child, log = start_run(workdir, log_path)
    try:
        wait_for(log_path, "] [3] train/", child)
        child.send_signal(signum)
        assert child.wait(timeout=300) == 128 + signum, log_path.read_text()[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
        log.close()
    text = log_path.read_text()
    stopped = [line for line in text.splitlines() if "received: stopped after step" in line]
    assert len(stopped) == 1 and "Traceback" not in text, text[-3000:]
    step = int(stopped[0].split("stopped after step ")[1].split()[0])
    assert 3 <= step < 12 and (workdir / "checkpoints" / str(step)).is_dir()
    rerun = run_main(workdir, log_every=1)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step {step}" in rerun.stderr
    assert_trees_equal(valign_jax.load_trained(workdir)[1],
                       valign_jax.load_trained(uninterrupted)[1])


def test_a_second_signal_exits_at_once(tmp_path):
    """Two SIGTERMs in a row: the second ends the process without waiting for the step."""
    workdir, log_path = tmp_path / "run", tmp_path / "log"
    child, log = start_run(workdir, log_path, total_steps=400, checkpoint_every=400)
    try:
        wait_for(log_path, "] [2] train/", child)
        child.send_signal(signal.SIGTERM)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
        log.close()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_worker_processes_end_with_the_run(tmp_path, how):
    """With data.workers=2, the grain worker processes (found by PID while the run trains) are
    gone once the run has ended by SIGTERM or by kill -9."""
    workdir, log_path = tmp_path / "run", tmp_path / "log"
    child, log = start_run(workdir, log_path, **{"data.workers": 2, "total_steps": 400,
                                                 "checkpoint_every": 400})
    try:
        wait_for(log_path, "] [2] train/", child)
        workers = [p.pid for p in psutil.Process(child.pid).children(recursive=True)
                   if "python" in " ".join(p.cmdline())]
        assert workers, "the run started no worker process"
        child.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
        child.wait(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
        log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(pid) and psutil.Process(
            pid).status() != psutil.STATUS_ZOMBIE for pid in workers):
        time.sleep(0.2)
    alive = [pid for pid in workers if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"orphaned workers {alive} after {how}"
    for pid in alive:
        os.kill(pid, signal.SIGKILL)


def test_a_second_run_on_a_busy_workdir_is_refused_naming_the_first(tmp_path):
    """While one run trains, the same command in the same workdir exits 1 naming the first run's
    process; after the first is killed with kill -9, the rerun goes ahead."""
    workdir, log_path = tmp_path / "run", tmp_path / "log"
    child, log = start_run(workdir, log_path, total_steps=400, checkpoint_every=400)
    try:
        wait_for(log_path, "] [1] train/", child)
        second = run_main(workdir, timeout=120)
        assert second.returncode == 1, second.stderr[-2000:]
        fatal = [line for line in second.stderr.splitlines() if line.startswith("FATAL")]
        assert len(fatal) == 1 and f"pid {child.pid}" in fatal[0], second.stderr[-2000:]
        child.kill()
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        log.close()
    third = run_main(workdir, total_steps=2, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
