"""The parts of a training run around the loop: checking the workdir, building the model and
its starting parameters from the config, the objective, and where metrics go.

Kept apart from train.py so the loop itself reads in one pass.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging as std_logging
import math
import os
from pathlib import Path

import jax
import numpy as np
from absl import logging
from etils import epath

from valign_jax import checkpointing, sharding, storage
from valign_jax.models import build
from valign_jax.models.registry import FeaturesConfig, overlay
from valign_jax.train_step import clip_refine_objective, contrastive_objective, itm_objective


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


def load_config(spec: str):
    """A config from a string like 'configs/clip.py:demo' (path relative to the cwd or absolute)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} (from {spec!r}) does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


@contextlib.contextmanager
def checkpoint_errors(config):
    """Turn an unreachable checkpoint into an error that says what to do offline."""
    try:
        yield
    except FileNotFoundError as err:
        named = [c for c in (config.model.image.checkpoint, config.model.text.checkpoint,
                             config.model.init_from) if c]
        raise FileNotFoundError(
            f"{err}\nThis config names checkpoints {named}. Without network access to the "
            f"Hugging Face hub, run the recipe's ':demo' variant (tiny towers, embedded data, "
            f"offline), or point config.model.image.checkpoint / config.model.text.checkpoint "
            f"(or config.model.init_from) at local directories.") from err


def build_model(config):
    with checkpoint_errors(config):
        return build.build_dual_encoder(config.model)


def initial_params(config, model, param_sh):
    """Fresh parameters, overlaid with pretrained weights: the tower checkpoints, or everything
    from `config.model.init_from` (a full CLIP checkpoint or a previous run's workdir)."""
    init = jax.jit(lambda rng: model.init(rng, **model.dummy_inputs())["params"],
                   out_shardings=param_sh)
    params = init(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
    with checkpoint_errors(config):
        source = config.model.init_from
        if source and (storage.path(source) / checkpointing.MODEL_JSON).is_file():
            pretrained, step = checkpointing.restore_params(source)
            logging.info("initialising from %s (step %d)", source, step)
        elif source:
            from valign_jax import hf
            _, pretrained = hf.load_dual_encoder(source, dtype=config.model.dtype,
                                                 scan_layers=config.model.scan_layers)
        elif isinstance(model.image_config, FeaturesConfig):
            pretrained = {}  # trains from cached features: the model has no towers to load
        else:
            pretrained = build.pretrained_towers(config.model)
    if not pretrained:
        return params
    merged = overlay(jax.device_get(params), pretrained)
    return sharding.put(merged, param_sh)


def input_setup(config, model):
    """(image size, Collate): how records become model inputs, for training and evaluation."""
    from valign_jax.data import pipeline
    image_size = config.model.image.image_size or getattr(model.image_config, "image_size", 0)
    tokenizer = pipeline.make_tokenizer(config.model.text, config.data.lower_case)
    mean, std = pipeline.normalization(config.model.image, config.data)
    return image_size, pipeline.Collate(tokenizer, mean, std,
                                        multi_positive=config.objective.multi_positive)


def make_objective(objective_cfg, mesh):
    if objective_cfg.kind == "clip_refine":
        c = objective_cfg.clip_refine
        return clip_refine_objective(tuple(c.weights), c.prior_std, c.rafa_form, c.alpha,
                                     c.temperature, c.hycd_features)
    chunked = objective_cfg.chunked and objective_cfg.kind == "sigmoid"
    objective = contrastive_objective(objective_cfg.kind, objective_cfg.norm,
                                      mesh=mesh if chunked else None,
                                      batch_axes=sharding.BATCH_AXES)
    if objective_cfg.get("itm_weight", 0.0):  # the fusion re-ranker's matching loss
        objective = itm_objective(objective, objective_cfg.itm_weight,
                                  objective_cfg.get("itm_negatives", 1))
    return objective


def write_run_files(workdir: epath.Path, config, model) -> None:
    """config.json and model.json; a workdir holding a different model is refused."""
    description = build.describe(model)
    model_file = workdir / checkpointing.MODEL_JSON
    if model_file.is_file():
        previous = json.loads(model_file.read_text())
        current = json.loads(json.dumps(description))
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current)
                             if previous.get(k) != current.get(k))
            raise ValueError(f"{workdir} holds a run of a different model ({model_file} differs "
                             f"in {changed}); use a new --workdir")
    checkpointing.write_json(model_file, description)
    checkpointing.write_json(workdir / checkpointing.CONFIG_JSON,
                             json.loads(config.to_json_best_effort()))


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


class _DropInfoFrom(std_logging.Filter):
    """Orbax and grain log every save and read at INFO; keep their warnings only."""

    def __init__(self, *packages):
        super().__init__()
        self.packages = tuple(f"/{p}/" for p in packages)

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or not any(
            p in record.pathname for p in self.packages)


def quiet_library_logs():
    logging.get_absl_handler().addFilter(_DropInfoFrom("orbax", "grain"))
