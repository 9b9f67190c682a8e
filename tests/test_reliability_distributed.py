"""Two processes on this machine train as one (issue 10, item 3).

Two children run the command a user runs on each host of a cluster,
`python -m valign_jax.main ...` with VALIGN_COORDINATOR_ADDRESS / VALIGN_NUM_PROCESSES /
VALIGN_PROCESS_ID (sharding.initialize_distributed -> jax.distributed.initialize), one CPU
device each and gloo collectives: a mesh of 2 devices, each process feeding half of every
global batch of 8. The reference is the same config trained by this process alone on one
device, with the whole batch of 8.
"""

import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

import valign_jax
from valign_jax import train

from conftest import REPO
from reliability_helpers import child_env, flat, main_command, read_metrics, run_config

CHANGES = {"total_steps": 10, "log_every": 1, "checkpoint_every": 5, "eval_every": 10}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_losses(workdir) -> dict:
    """{step: train/loss} from the run's TensorBoard events (logged every step here)."""
    import tensorflow as tf
    losses = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "train/loss":
                    losses[event.step] = float(tf.make_ndarray(value.tensor))
    return losses


def start_two(workdir, logs_dir, port: int, **changes):
    children = []
    for index in range(2):
        env = child_env(JAX_PLATFORMS="cpu", VALIGN_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                        VALIGN_NUM_PROCESSES="2", VALIGN_PROCESS_ID=str(index))
        log = open(logs_dir / f"process_{index}.log", "w")
        children.append((subprocess.Popen(main_command(workdir, **{**CHANGES, **changes}),
                                          cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT), log))
    return children


def finish(children, meanwhile=None) -> list[int]:
    """The children's exit codes, once `meanwhile()` (if given) has run; none is left
    running."""
    try:
        if meanwhile is not None:
            meanwhile()
        return [child.wait(timeout=600) for child, _ in children]
    finally:
        for child, log in children:
            if child.poll() is None:
                child.kill()
            log.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if jax.default_backend() != "cpu":
        pytest.skip("compares against this process's run, which must be on CPU too")
    root = tmp_path_factory.mktemp("distributed")
    children = start_two(root / "two", root, free_port())
    codes = finish(children, lambda: train.train_and_evaluate(run_config(**CHANGES),
                                                              root / "one"))  # meanwhile
    logs = [(root / f"process_{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    return root / "two", root / "one"


def test_two_processes_give_the_losses_of_one(runs):
    """Asserts: the loss of each of the 10 steps (process 0's TensorBoard events) equals the
    single-process run's within 1e-5, and the run learns."""
    two, one = runs
    two_losses, one_losses = train_losses(two), train_losses(one)
    assert sorted(one_losses) == list(range(1, 11))
    assert sorted(two_losses) == sorted(one_losses)
    np.testing.assert_allclose([two_losses[s] for s in sorted(two_losses)],
                               [one_losses[s] for s in sorted(one_losses)], atol=1e-5, rtol=0)
    assert one_losses[10] < one_losses[1], "the run learns"


def test_two_processes_write_one_checkpoint_and_one_metrics_log(runs):
    """Asserts: the shared workdir holds checkpoints 5 and 10 once each, nothing half-written,
    each with the data-iterator position of both processes; metrics.jsonl has one line per
    evaluation (steps 0 and 10, not one per process); the final parameters load with
    load_trained and agree with the single-process run's within 1e-4."""
    two, one = runs
    directory = two / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["10", "5"]
    for step in ("5", "10"):
        data = sorted(p.name for p in (directory / step / "data").glob("process_*"))
        assert data == ["process_0-of-2.json", "process_1-of-2.json"], data
    assert [m["step"] for m in read_metrics(two)] == [0, 10]
    params_two, params_one = (flat(valign_jax.load_trained(w)[1]) for w in (two, one))
    assert sorted(params_two) == sorted(params_one)
    for name, value in params_one.items():
        np.testing.assert_allclose(params_two[name], value, atol=1e-4, rtol=0, err_msg=name)


def test_sigterm_on_both_hosts_stops_them_at_one_step_and_the_rerun_finishes(runs, tmp_path):
    """SIGTERM to both processes (as a scheduler preempting the job sends it) once process 0
    has logged step 3: both save the same step and exit 143; the same two commands again
    finish the run, whose parameters agree with the single-process run's within 1e-4."""
    _, one = runs
    workdir = tmp_path / "two"
    for attempt in ("stopped", "rerun"):
        logs_dir = tmp_path / attempt
        logs_dir.mkdir()
        children = start_two(workdir, logs_dir, free_port())

        def stop_after_step_3():
            log0 = logs_dir / "process_0.log"
            for _ in range(1500):
                if "] [3] train/" in log0.read_text() or children[0][0].poll() is not None:
                    break
                time.sleep(0.2)
            for child, _ in children:
                child.send_signal(signal.SIGTERM)
        codes = finish(children, stop_after_step_3 if attempt == "stopped" else None)
        texts = [(logs_dir / f"process_{i}.log").read_text() for i in range(2)]
        want = [128 + signal.SIGTERM] * 2 if attempt == "stopped" else [0, 0]
        assert codes == want, "\n\n".join(t[-3000:] for t in texts)
        if attempt == "stopped":
            steps = {t.split("stopped after step ")[1].split()[0] for t in texts}
            assert len(steps) == 1, steps  # both hosts agreed on the step
            assert (workdir / "checkpoints" / steps.pop()).is_dir()
    params_two, params_one = (flat(valign_jax.load_trained(w)[1]) for w in (workdir, one))
    for name, value in params_one.items():
        np.testing.assert_allclose(params_two[name], value, atol=1e-4, rtol=0, err_msg=name)
