"""A preempted run resumes as the run it was, and no checkpoint is ever lost (issue 10: items 1,
2, 4, 5 and 8).

The run is configs/clip.py:demo cut to 12 steps of 8 with a checkpoint every 4
(reliability_helpers.RUN). The reference is the same run trained straight through in this
process. The preempted one is the command a user reruns, the flags of `python -m
valign_jax.main ...`, in a child process that tests/kill_run.py kills with SIGKILL at an exact
point: no cleanup runs, as with `kill -9` or a preempted TPU VM.
"""

import errno
import os
import signal

import numpy as np
import orbax.checkpoint as ocp
import pytest

import valign_jax
from valign_jax import checkpointing, train

from reliability_helpers import (assert_trees_equal, fail_writes_under, flat, nan_pixels_at,
                                 read_metrics, run_config, run_main)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train.train_and_evaluate(run_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """One workdir, the same command four times: SIGKILLed after step 2 (before the first
    checkpoint), after step 6 (between checkpoints 4 and 8), while checkpoint 8 is being
    written, then left to finish. After each: the checkpoints directory's entries, the
    parameters load_trained finds there, and the run's log."""
    workdir = tmp_path_factory.mktemp("preempted")
    seen = {}
    for point in ("step:2", "step:6", "save:8", ""):
        proc = run_main(workdir, sigkill_at=point)
        assert proc.returncode == (-signal.SIGKILL if point else 0), proc.stderr[-4000:]
        directory = workdir / "checkpoints"
        entries = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        params = valign_jax.load_trained(workdir)[1] if any(map(str.isdigit, entries)) else None
        half_written = {e: sorted(str(f.relative_to(directory / e))
                                  for f in (directory / e).rglob("*") if f.is_file())
                        for e in entries if ".orbax-checkpoint-tmp" in e}
        seen[point or "finished"] = {"entries": entries, "params": params, "log": proc.stderr,
                                     "half_written": half_written}
    return workdir, seen


def resumed_at(log: str):
    lines = [line for line in log.splitlines() if "resumed from" in line]
    return int(lines[-1].rsplit(" ", 1)[-1]) if lines else None


def test_killed_before_and_between_checkpoints_the_rerun_resumes_from_the_last_one(preempted):
    """SIGKILL after step 2 and after step 6. Asserts: the first kill leaves no checkpoint and
    the rerun starts from step 0; the second leaves exactly checkpoint 4 (its content: the
    determinism test below) and the next rerun resumes from step 4."""
    _, seen = preempted
    assert seen["step:2"]["entries"] == []
    assert resumed_at(seen["step:6"]["log"]) is None
    assert seen["step:6"]["entries"] == ["4"]
    assert resumed_at(seen["save:8"]["log"]) == 4


def test_a_checkpoint_killed_mid_write_is_never_picked_as_the_latest(preempted, uninterrupted):
    """SIGKILL while checkpoint 8 is written (its arrays on disk, the directory not yet
    committed). Asserts: the half-written directory is there, holding the state, yet
    load_trained returns checkpoint 4 (bit-identical to the uninterrupted run's step 4) and the
    rerun resumes from step 4; that rerun deletes the half-written directory."""
    _, seen = preempted
    half_written = seen["save:8"]["half_written"]
    assert seen["save:8"]["entries"] == ["4", *half_written] and len(half_written) == 1
    [(name, files)] = half_written.items()
    assert name.startswith("8.") and any(f.startswith("state") for f in files), files
    assert_trees_equal(seen["save:8"]["params"], valign_jax.load_trained(uninterrupted, 4)[1])
    assert resumed_at(seen["finished"]["log"]) == 4
    assert seen["finished"]["entries"] == ["12", "4", "8"]


def test_rerunning_after_every_kill_ends_bit_identical_to_an_uninterrupted_run(
        preempted, uninterrupted):
    """After the three kills the fourth run finishes. Asserts: its parameters at steps 8 and
    12 (load_trained) equal the uninterrupted run's bit for bit, and so does its final
    metrics.jsonl line (evaluation and the mean training loss since the last log)."""
    workdir, _ = preempted
    for step in (8, 12):
        assert_trees_equal(valign_jax.load_trained(workdir, step)[1],
                           valign_jax.load_trained(uninterrupted, step)[1])
    assert read_metrics(workdir)[-1] == read_metrics(uninterrupted)[-1]


def test_the_same_seed_gives_bit_identical_parameters_and_another_seed_does_not(
        preempted, uninterrupted, tmp_path):
    """Two runs from scratch with seed 0, the reference in this process and the preempted
    command's second run (a fresh process; it wrote checkpoint 4), and one in this process with
    config.seed=1. Asserts: after 4 steps the two seed-0 runs' parameters are bit-identical;
    the seed-1 run's differ in every parameter array."""
    reference = valign_jax.load_trained(uninterrupted, 4)[1]
    assert_trees_equal(preempted[1]["step:6"]["params"], reference)
    train.train_and_evaluate(run_config(seed=1), tmp_path)
    other, reference = flat(valign_jax.load_trained(tmp_path, 4)[1]), flat(reference)
    same = [name for name, value in reference.items() if np.array_equal(other[name], value)]
    assert not same


def saved_state(workdir, step):
    """Everything checkpoint `step` holds for the train state, as written."""
    path = workdir / "checkpoints" / str(step) / "state"
    return ocp.PyTreeCheckpointer().restore(path)


def test_skip_mode_drops_a_non_finite_step_and_counts_it(tmp_path, monkeypatch, caplog):
    """config.on_nonfinite="skip"; training step 3's batch has NaN pixels; 5 steps with a
    checkpoint after every step. Asserts: the run finishes; checkpoint 3's parameters and
    optimizer state equal checkpoint 2's bit for bit while step and skipped_steps move on;
    step 4 trains again (its parameters differ) and everything stays finite; metrics.jsonl
    reports train/skipped_steps = 1 and a finite train/loss; the log names step 3."""
    config = run_config(total_steps=5, checkpoint_every=1, log_every=1, eval_every=5,
                        keep_checkpoints=5, on_nonfinite="skip")
    nan_pixels_at(monkeypatch, steps={3})
    final = train.train_and_evaluate(config, tmp_path)

    before, skipped, after = (saved_state(tmp_path, s) for s in (2, 3, 4))
    assert_trees_equal(skipped["params"], before["params"])
    assert_trees_equal(skipped["opt_state"], before["opt_state"])
    assert (int(skipped["step"]), int(skipped["skipped_steps"])) == (3, 1)
    assert int(after["skipped_steps"]) == 1
    moved = [k for k, v in flat(after["params"]).items()
             if not np.array_equal(v, flat(skipped["params"])[k])]
    assert len(moved) >= 0.9 * len(flat(after["params"]))
    assert all(np.isfinite(v).all() for v in flat(saved_state(tmp_path, 5)["params"]).values())
    assert final["train/skipped_steps"] == 1 and np.isfinite(final["train/loss"])
    assert "training step(s) [3] had a non-finite loss" in caplog.text


@pytest.mark.parametrize("error, what, where", [
    (errno.ENOSPC, "files", "4.orbax-checkpoint-tmp/state"),  # disk full, in the async write
    (errno.EROFS, "directories", "4."),                       # workdir turned read-only
], ids=["disk_full", "read_only"])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_previous(
        tmp_path, monkeypatch, error, what, where):
    """6 steps, a checkpoint every 2, keep_checkpoints=1 (so orbax deletes checkpoint 2 once a
    newer one is complete). Writing checkpoint 4 fails with `error`: file writes under it
    (disk full, while the arrays are written in the background) or making its directory (a
    read-only workdir). Asserts: the run stops with a CheckpointWriteError (an OSError) naming
    step 4, the cause and checkpoint 2 as intact; checkpoint 2 is still on disk and loads;
    rerunning once the disk is fixed resumes from it and finishes."""
    config = run_config(total_steps=6, checkpoint_every=2, log_every=2, eval_every=6,
                        keep_checkpoints=1)
    refused = fail_writes_under(monkeypatch, f"{tmp_path / 'checkpoints' / where}", error, what)
    with pytest.raises(checkpointing.CheckpointWriteError) as raised:
        train.train_and_evaluate(config, tmp_path)
    message = str(raised.value)
    assert refused and raised.value.errno == error
    assert "checkpoint of step 4" in message and os.strerror(error) in message
    assert "the previous checkpoint, step 2, is intact" in message
    assert "2" in os.listdir(tmp_path / "checkpoints")
    params, step = checkpointing.restore_params(tmp_path)
    assert step == 2 and all(np.isfinite(v).all() for v in flat(params).values())

    monkeypatch.undo()  # the disk is fixed; the same command again
    final = train.train_and_evaluate(config, tmp_path)
    assert final["step"] == 6
    assert [m["step"] for m in read_metrics(tmp_path)].count(0) == 1, "resumed, not restarted"


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    """A SIGKILL during an append leaves metrics.jsonl ending in a cut line: the resumed run's
    reader returns the last complete line and removes the cut one, so the next append starts
    on a line of its own and every line parses."""
    import json
    from valign_jax.workdir import _last_line
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1.0}\n{"step": 4, "a": 2.0}\n{"step": 8, "a"')
    assert _last_line(path) == {"step": 4, "a": 2.0}
    with open(path, "a") as f:
        f.write(json.dumps({"step": 8, "a": 3.0}) + "\n")
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 4, 8]
