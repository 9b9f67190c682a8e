"""A run's directory: made and probed before compute, the files that describe the run, the
metrics it logs, and reading a finished run back.

    <workdir>/config.json      the run's config
    <workdir>/model.json       the dual encoder's architecture (load_run rebuilds it)
    <workdir>/metrics.jsonl    one JSON object per evaluation: {"step", <group>/<name>: value}
    <workdir>/checkpoints/     checkpointing.py
    <workdir>/events.out.*     TensorBoard (clu writers)

A workdir may be a local path or a URL (storage.py).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from valign_jax import build, checkpointing, storage


def prepare_workdir(workdir) -> epath.Path:
    """The workdir (a local path or a URL: storage.py), created and proven writable before any
    compute starts. Each process probes with its own file: on a pod every host must reach it."""
    if not workdir:
        raise ValueError("--workdir is required for a training run")
    storage.check_client(workdir)
    path = storage.path(workdir)
    probe = path / f".write_test_{jax.process_index()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write to the workdir {path}: {err.strerror or err}; choose a "
                      f"writable --workdir") from err
    return path


def write_run_files(workdir: epath.Path, config, model) -> None:
    """config.json and model.json; a workdir holding a different model is refused."""
    description = build.describe(model)
    model_file = workdir / checkpointing.MODEL_JSON
    if model_file.is_file():
        changed = build.description_changes(json.loads(model_file.read_text()), description)
        if changed:
            raise ValueError(f"{workdir} holds a run of a different model ({model_file} differs "
                             f"in {changed}); use a new --workdir")
    checkpointing.write_json(model_file, description)
    checkpointing.write_json(workdir / checkpointing.CONFIG_JSON,
                             json.loads(config.to_json_best_effort()))


def load_run(workdir, step: int | None = None):
    """(model, params as host arrays, step, config) of a training run's checkpoint `step`
    (the latest by default)."""
    workdir = storage.path(workdir)
    files = [workdir / checkpointing.MODEL_JSON, workdir / checkpointing.CONFIG_JSON]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: {workdir} is not a valign_jax training "
                                    f"workdir (python -m valign_jax.main ... --workdir=DIR)")
    model = build.from_description(json.loads(files[0].read_text()), source=str(files[0]))
    config = ml_collections.ConfigDict(json.loads(files[1].read_text()))
    params, step = checkpointing.restore_params(workdir, step)
    return model, params, step, config


class MetricsLog:
    """clu writers (TensorBoard + log), progress reports and <workdir>/metrics.jsonl."""

    def __init__(self, workdir: epath.Path, config, total_steps: int):
        from clu import metric_writers, periodic_actions
        primary = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(os.fspath(workdir),
                                                           just_logging=not primary)
        self.writer.write_hparams(_scalar_hparams(config))
        self.report = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                                      writer=self.writer, every_secs=30)
        self.path = workdir / "metrics.jsonl" if primary else None
        self.train_loss = None
        self.skipped = 0  # broken training records dropped by this process so far
        self.last = _last_line(workdir / "metrics.jsonl")  # a resumed run's latest so far

    def progress(self, step: int) -> None:
        self.report(step)

    def train_metrics(self, step: int, pending: list) -> None:
        """Means over the steps since the last call, as `train/<name>`."""
        values = jax.device_get(pending)
        means = {f"train/{k}": float(np.mean([v[k] for v in values])) for k in values[0]}
        self.train_loss = means["train/loss"]
        self.writer.write_scalars(step, means)

    def write(self, step: int, metrics: dict) -> None:
        metrics = dict(metrics)
        if self.train_loss is not None:
            metrics["train/loss"] = self.train_loss
        metrics["data/skipped_examples"] = self._all_processes(self.skipped)
        self.writer.write_scalars(step, metrics)
        if self.path is not None:
            storage.append_line(self.path, json.dumps({"step": step, **metrics}))
        self.last = {"step": step, **metrics}

    @staticmethod
    def _all_processes(count: int) -> int:
        if jax.process_count() == 1:
            return count
        from jax.experimental import multihost_utils
        return int(np.sum(multihost_utils.process_allgather(np.int64(count))))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _last_line(path: epath.Path) -> dict:
    """The last complete line of metrics.jsonl. A run killed mid-append leaves a cut line: it is
    dropped from the file (the resumed run writes that evaluation again)."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        logging.warning("%s: dropping a cut last line %r", path, lines[-1][:80])
        path.write_text("".join(line + "\n" for line in lines[:-1]))
        return json.loads(lines[-2]) if len(lines) > 1 else {}


def _scalar_hparams(config) -> dict:
    """The config flattened to 'a.b.c' keys with TensorBoard-friendly values."""
    out = {}

    def walk(prefix, value):
        if hasattr(value, "items"):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix[:-1]] = value
        else:
            out[prefix[:-1]] = str(value)
    walk("", config)
    return out
