"""A run's directory: made, probed and locked before compute, the files that describe the run,
the metrics it logs, and reading a finished run back.

    <workdir>/config.json      the run's config
    <workdir>/model.json       the dual encoder's architecture (load_run rebuilds it)
    <workdir>/state.json       what the saved train state's layout depends on (trainable set,
                               optimizer, data workers): a rerun that changes it is refused
    <workdir>/run.lock         held by the run in progress (workdir_lock.py)
    <workdir>/metrics.jsonl    one JSON object per evaluation: {"step", <group>/<name>: value}
    <workdir>/checkpoints/     checkpointing.py
    <workdir>/events.out.*     TensorBoard (clu writers)

A workdir may be a local path or a URL (storage.py).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from valign_jax import build, checkpointing, logs, storage, workdir_lock

STATE_JSON = "state.json"


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


class RunDirectory:
    """The workdir of a run that is starting: made, probed and locked on entry (one run per
    workdir, workdir_lock.py); the lock is released on exit. A start that fails before
    `started()` leaves the directory as it was: what this run created in it is removed (the
    whole directory when it did not exist)."""

    def __init__(self, workdir):
        self.path = storage.path(workdir) if workdir else None
        self._existed = bool(self.path) and self.path.exists()
        self._before, self._lock, self._started = None, None, False

    def __enter__(self) -> "RunDirectory":
        self.path = prepare_workdir(self.path)
        self._lock = workdir_lock.acquire_for_run(self.path)
        # Only what appears while this run holds the lock is its own to remove.
        self._before = {p.name for p in self.path.iterdir()} if self._existed else set()
        return self

    def started(self) -> None:
        """From here on the run's files stay, whatever happens."""
        self._started = True

    def __exit__(self, exc_type, exc, tb):
        if self._lock is not None:
            self._lock.release()
        if (exc_type is not None and not self._started and self._before is not None
                and jax.process_index() == 0):
            self._undo()
        return False

    def _undo(self) -> None:
        try:
            if not self._existed:
                shutil.rmtree(self.path) if not storage.is_url(self.path) else self.path.rmtree()
                return
            for entry in self.path.iterdir():
                if entry.name not in self._before:
                    if entry.is_dir():
                        entry.rmtree()
                    else:
                        entry.unlink()
        except OSError as err:  # the start's own error matters more than the cleanup's
            logging.warning("could not remove what the failed start wrote in %s: %s",
                            self.path, err)


def state_layout(config, trainable_paths) -> dict:
    """What a checkpoint's train state and iterator state are shaped by: the trainable set
    (optimizer state exists for it alone), the optimizer and the data-worker layout."""
    return {"trainable": sorted("/".join(p) for p in trainable_paths),
            "optimizer": config.optim.name,
            "gradient_clipping": bool(config.optim.grad_clip_norm),
            "data_workers": int(config.data.workers),
            "peft.recipe": config.peft.recipe, "peft.overrides": list(config.peft.overrides)}


def write_run_files(workdir: epath.Path, config, model, layout: dict | None = None) -> None:
    """config.json, model.json and state.json. A workdir holding a different model, or a run
    whose saved state has another layout (trainable set, optimizer, data workers), is refused
    before anything is overwritten."""
    description = build.describe(model)
    model_file = workdir / checkpointing.MODEL_JSON
    if model_file.is_file():
        changed = build.description_changes(json.loads(model_file.read_text()), description)
        if changed:
            raise ValueError(f"{workdir} holds a run of a different model ({model_file} differs "
                             f"in {changed}); use a new --workdir")
    state_file = workdir / STATE_JSON
    if layout is not None and state_file.is_file():
        _refuse_another_layout(json.loads(state_file.read_text()), layout, workdir)
    checkpointing.write_json(model_file, description)
    checkpointing.write_json(workdir / checkpointing.CONFIG_JSON,
                             json.loads(config.to_json_best_effort()))
    if layout is not None:
        checkpointing.write_json(state_file, layout)


def _refuse_another_layout(saved: dict, layout: dict, workdir) -> None:
    saved_names = {k: v for k, v in saved.items() if k != "trainable"}
    changed = [f"{k}: {saved_names.get(k)!r} -> {v!r}" for k, v in layout.items()
               if k != "trainable" and saved_names.get(k) != v]
    gained = sorted(set(layout["trainable"]) - set(saved.get("trainable", ())))
    lost = sorted(set(saved.get("trainable", ())) - set(layout["trainable"]))
    if gained or lost:
        changed.append(f"trainable parameters: {len(gained)} more (e.g. {gained[:2]}), "
                       f"{len(lost)} fewer (e.g. {lost[:2]})")
    if changed:
        raise ValueError(f"{workdir} holds a run whose saved train state was laid out "
                         f"differently, so it cannot resume with this config: "
                         f"{'; '.join(changed)}. Rerun with the original settings, or use a "
                         f"new --workdir (config.model.init_from={str(workdir)!r} starts a new "
                         f"run from this one's parameters)")


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
        from clu import periodic_actions
        primary = jax.process_index() == 0
        self.writer = logs.metric_writer(os.fspath(workdir), primary)
        self.writer.write_hparams(_scalar_hparams(config))
        self.report = periodic_actions.ReportProgress(num_train_steps=total_steps,
                                                      writer=self.writer, every_secs=30)
        self.path = workdir / "metrics.jsonl" if primary else None
        self.train_loss = None
        self.skipped = 0  # broken training records dropped by this process so far
        self.broken_shards = 0  # tar shards of the training data cut short or unreadable
        self.last = _last_line(workdir / "metrics.jsonl")  # a resumed run's latest so far

    def resume_at(self, step: int) -> None:
        """Forget the lines a killed run wrote beyond its last checkpoint (the resumed run
        writes them again, the same), so no step appears twice; at step 0, all of them."""
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if step and json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            logging.info("%s: dropping %d line(s) past step %d, written before the run was "
                         "stopped", self.path, len(lines) - len(kept), step)
            tmp = self.path.parent / (self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self.last = json.loads(kept[-1]) if kept else {}

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
        if self.broken_shards:  # their records beyond the damage are lost, uncounted
            metrics["data/broken_shards"] = self.broken_shards
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

    def close(self, raise_errors: bool = True) -> None:
        """Flush and close the writers; raise_errors=False (closing because of another error,
        which must not be masked) logs a failure instead."""
        try:
            self.writer.flush()
            self.writer.close()
        except OSError as err:
            if raise_errors:
                raise
            logging.error("%s", err)


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
