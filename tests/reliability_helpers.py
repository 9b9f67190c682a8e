"""Shared by the reliability tests: one tiny run, given both as a config (for runs in this
process) and as the `python -m valign_jax.main` command that a user reruns after a preemption,
and the ways those tests break a run (SIGKILL, NaN batches, failing writes)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from flax import traverse_util

from valign_jax import sharding
from valign_jax.recipes import load_config

from conftest import REPO

CONFIG = "configs/clip.py:demo"
# 12 steps of 8, a checkpoint every 4, evaluated at the start and the end only.
RUN = {"total_steps": 12, "batch_size": 8, "data.num_train": 64, "data.num_eval": 16,
       "eval.batch_size": 16, "eval.zeroshot": "", "checkpoint_every": 4, "eval_every": 12,
       "log_every": 4, "keep_checkpoints": 3}


def run_config(**changes):
    """The config `main_command` passes on the command line, built in this process."""
    config = load_config(f"{REPO}/{CONFIG}")
    config.update_from_flattened_dict({**RUN, **changes})
    return config


def main_command(workdir, **changes) -> list:
    overrides = [f"--config.{key}={value}" for key, value in {**RUN, **changes}.items()]
    return [sys.executable, "-m", "valign_jax.main", f"--config={CONFIG}",
            f"--workdir={workdir}", *overrides]


def child_env(**extra) -> dict:
    """This process's environment plus its XLA compilation cache, so children reuse compiled
    steps instead of compiling them again."""
    return {**os.environ,
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", **extra}


def run_main(workdir, sigkill_at: str = "", timeout: int = 300, **changes):
    """Run the command to its end, or until tests/kill_run.py kills it at `sigkill_at`."""
    command = main_command(workdir, **changes)
    if sigkill_at:  # the same flags, through the runner that kills at the point
        command = [sys.executable, str(REPO / "tests" / "kill_run.py"), sigkill_at, *command[3:]]
    return subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(workdir) -> list:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def flat(params) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def assert_trees_equal(actual, expected):
    """Bit for bit, array by array, naming the first that differs."""
    actual = jax.tree_util.tree_leaves_with_path(actual)
    expected = jax.tree_util.tree_leaves_with_path(expected)
    assert [path for path, _ in actual] == [path for path, _ in expected]
    for (path, a), (_, b) in zip(actual, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path))


def nan_pixels_at(monkeypatch, steps):
    """Training steps `steps` (1-based) get batches whose pixels are all NaN: a corrupt batch,
    entering where every batch does (sharding.global_batch); evaluation batches are untouched.
    The NaN pixels are float32 whatever the stream's dtype (uint8 batches cannot hold a NaN;
    float ones pass the on-device normalisation unchanged)."""
    real_global_batch, calls = sharding.global_batch, []

    def corrupting(local, mesh):
        if {"pixel_values", "input_ids"} <= set(local):  # training batches only
            calls.append(1)
            if len(calls) in steps:
                shape = local["pixel_values"].shape
                local = {**local, "pixel_values": np.full(shape, np.nan, np.float32)}
        return real_global_batch(local, mesh)
    monkeypatch.setattr(sharding, "global_batch", corrupting)


def fail_writes_under(monkeypatch, prefix: str, error: int, what: str = "files"):
    """Every file opened for writing (what="files") or every directory made
    (what="directories") at a path starting with `prefix` fails with OSError(`error`), as a
    full disk (ENOSPC) or a directory that turned read-only (EROFS, EACCES) fails them. Both
    are Python's own calls, which orbax's metadata and grain's iterator state go through (the
    arrays are written by tensorstore). Returns the paths refused."""
    import builtins
    refused, real_open, real_mkdir = [], builtins.open, os.mkdir

    def refuse(path):
        refused.append(str(path))
        raise OSError(error, os.strerror(error), str(path))

    def open_(file, mode="r", *args, **kwargs):
        if str(file).startswith(prefix) and set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(prefix):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)
    if what == "files":
        monkeypatch.setattr(builtins, "open", open_)
    else:
        monkeypatch.setattr(os, "mkdir", mkdir)
    return refused
