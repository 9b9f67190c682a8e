"""Reruns in a workdir that already holds a run: what a rerun may change, what it must refuse,
and how the log stays one line per evaluated step. Also: no update that leaves a parameter
non-finite is ever kept, and library tracebacks stay out of the log."""

import json
import math

import numpy as np
import pytest

import valign_jax
from valign_jax import train
from valign_jax.config_checks import ConfigError

from reliability_helpers import read_metrics, run_config

SHORT = {"total_steps": 8, "checkpoint_every": 4, "eval_every": 4, "log_every": 4}


def test_a_cut_final_evaluation_is_completed_by_the_rerun(tmp_path):
    """A run killed during its final evaluation has its last checkpoint but no last metrics
    line (reproduced by removing that line): the rerun evaluates the last step, once."""
    final = train.train_and_evaluate(run_config(**SHORT), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:-1]))
    again = train.train_and_evaluate(run_config(**SHORT), tmp_path)
    steps = [m["step"] for m in read_metrics(tmp_path)]
    assert steps == [0, 4, 8]
    assert again["retrieval/t2i_r1"] == pytest.approx(final["retrieval/t2i_r1"], abs=1e-9)


def test_a_resumed_run_never_logs_a_step_twice(tmp_path):
    """A run resumed from checkpoint 4 while its log already holds step 8 (it was killed after
    evaluating 8 but before checkpoint 8 was on disk): the log holds each step once, and the
    rewritten line for step 8 equals the first."""
    train.train_and_evaluate(run_config(**SHORT), tmp_path)
    first = read_metrics(tmp_path)
    for entry in (tmp_path / "checkpoints").iterdir():
        if entry.name == "8":
            import shutil
            shutil.rmtree(entry)
    train.train_and_evaluate(run_config(**SHORT), tmp_path)
    second = read_metrics(tmp_path)
    assert [m["step"] for m in second] == [0, 4, 8]
    assert second[-1]["retrieval/t2i_r1"] == pytest.approx(first[-1]["retrieval/t2i_r1"],
                                                           abs=1e-9)


@pytest.mark.parametrize("change, named", [
    ({"peft.recipe": "projection"}, "peft.recipe: 'full' -> 'projection'"),
    ({"optim.name": "lion"}, "optimizer: 'adamw' -> 'lion'"),
    ({"data.workers": 2}, "data_workers: 0 -> 2"),
], ids=["peft", "optimizer", "workers"])
def test_a_rerun_with_another_state_layout_is_refused_naming_it(tmp_path, change, named):
    """A rerun whose trainable set, optimizer or data-worker layout differs from the saved
    run's is refused before anything is overwritten, naming the difference; config.json keeps
    the first run's values."""
    train.train_and_evaluate(run_config(**{**SHORT, "total_steps": 4}), tmp_path)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match="cannot resume with this config") as err:
        train.train_and_evaluate(run_config(**{**SHORT, **change}), tmp_path)
    assert named in str(err.value)
    assert (tmp_path / "config.json").read_text() == before


def test_a_longer_schedule_resumes(tmp_path):
    """What a rerun may change: the schedule (more steps), the learning rate, and how a step
    computes (remat, attention implementation): the parameters' layout is the same."""
    train.train_and_evaluate(run_config(**{**SHORT, "total_steps": 4}), tmp_path)
    final = train.train_and_evaluate(run_config(**{**SHORT, "optim.lr": 1e-4,
                                                   "model.remat": "full",
                                                   "model.attention_impl": "xla"}), tmp_path)
    assert final["step"] == 8


def test_non_finite_config_values_are_refused():
    for key in ("optim.lr", "optim.weight_decay", "objective.clip_refine.prior_std"):
        with pytest.raises(ConfigError, match=f"config.{key}=nan: must be a finite number"):
            train.train_and_evaluate(run_config(**{key: float("nan")}), "/nonexistent/never")


def test_skip_mode_refuses_an_update_that_makes_parameters_non_finite(tmp_path):
    """A learning rate so large that one update overflows float32 (finite in the config, inf
    in the parameters): with on_nonfinite="skip" every such update is dropped and counted, so
    the checkpoint holds the initial, finite parameters."""
    config = run_config(**{**SHORT, "total_steps": 4, "on_nonfinite": "skip",
                           "optim.lr": 1e39, "optim.warmup_init_lr": 1e39})
    final = train.train_and_evaluate(config, tmp_path)
    assert final["train/skipped_steps"] == 4
    params = valign_jax.load_trained(tmp_path)[1]
    leaves = [np.asarray(v) for v in __import__("jax").tree.leaves(params)]
    assert all(np.isfinite(v).all() for v in leaves)


def test_stop_mode_never_checkpoints_a_non_finite_update(tmp_path):
    """The same learning rate with on_nonfinite="stop" and a checkpoint after every step: the
    run stops at step 1, naming it, before saving a checkpoint with infinite parameters."""
    config = run_config(**{**SHORT, "total_steps": 4, "checkpoint_every": 1,
                           "optim.lr": 1e39, "optim.warmup_init_lr": 1e39})
    with pytest.raises(FloatingPointError, match="non-finite training values at step 1"):
        train.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints" / "1").exists()
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["step"] == 0 and math.isfinite(metrics["retrieval/t2i_r1"])


def test_a_failed_tensorboard_write_is_an_error_naming_the_directory():
    """clu reports a background write that failed (a full disk) as an AsyncError at the next
    call: the run's writer turns it into an OSError naming the events directory and the
    cause, which the command line prints as one FATAL line."""
    import errno
    from clu import asynclib
    from valign_jax.logs import GuardedWriter

    class FullDisk:
        def flush(self):
            try:
                raise OSError(errno.ENOSPC, "No space left on device", "/run/events")
            except OSError as cause:
                raise asynclib.AsyncError("a background write failed") from cause
    with pytest.raises(OSError, match="TensorBoard events in /run: .*No space left on device"):
        GuardedWriter(FullDisk(), "/run").flush()


def test_library_errors_keep_their_line_but_not_their_traceback():
    """An orbax error logged with its traceback reaches the log as its one message line; the
    run's own records are untouched."""
    import logging as std_logging
    import sys
    from valign_jax.logs import _QuietLibraries
    quiet = _QuietLibraries("orbax")
    try:
        raise OSError("No space left on device")
    except OSError:
        info = sys.exc_info()
    record = std_logging.LogRecord("x", std_logging.ERROR, "/site-packages/orbax/a.py", 1,
                                   "write failed", (), info)
    assert quiet.filter(record) and record.exc_info is None and record.getMessage()
    ours = std_logging.LogRecord("x", std_logging.ERROR, "/valign_jax/train.py", 1, "m", (),
                                 info)
    assert quiet.filter(ours) and ours.exc_info is not None
    chatter = std_logging.LogRecord("x", std_logging.INFO, "/site-packages/orbax/a.py", 1,
                                    "saved", (), None)
    assert not quiet.filter(chatter)


def _largest_array_file(step_dir):
    import os
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "no_state"])
def test_a_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(tmp_path, damage,
                                                                        caplog):
    """Through the loop and `evaluate`: checkpoint 8 of an 8-step run damaged (a byte flipped
    in its array data, its largest file cut short, or state/ removed). `evaluate` names it and
    reports step 4; the rerun names it, resumes from step 4 and ends with the parameters of the
    undamaged run, bit for bit."""
    import shutil
    from valign_jax import evaluate
    from reliability_helpers import assert_trees_equal
    train.train_and_evaluate(run_config(**SHORT), tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "reference")
    step_dir = tmp_path / "run" / "checkpoints" / "8"
    if damage == "no_state":
        shutil.rmtree(step_dir / "state")
    else:
        file = _largest_array_file(step_dir)
        data = bytearray(open(file, "rb").read())
        if damage == "flipped_byte":
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[:len(data) // 2]
        open(file, "wb").write(bytes(data))
    caplog.set_level("WARNING")
    result = evaluate.evaluate(workdir=tmp_path / "run", out=tmp_path / "eval.json")
    assert result["step"] == 4
    assert any("8" in r.getMessage() for r in caplog.records if r.levelname in ("WARNING",
                                                                               "ERROR"))
    train.train_and_evaluate(run_config(**SHORT), tmp_path / "run")
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [0, 4, 8]
    assert_trees_equal(valign_jax.load_trained(tmp_path / "run")[1],
                       valign_jax.load_trained(tmp_path / "reference")[1])
