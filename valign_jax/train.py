"""`train_and_evaluate(config, workdir)`: the one training loop every recipe runs.

A recipe is a config (configs/*.py): which towers and heads, which parameters train (peft), the
objective, the optimizer and the data. This loop does the same thing for all of them:

  build the model and its parameters (fresh, from tower checkpoints, or from a previous run)
  -> place parameters and optimizer state on the mesh -> resume from the workdir's latest
  checkpoint if there is one -> train, logging to clu writers, evaluating every eval_every steps
  into metrics.jsonl, checkpointing every checkpoint_every steps -> final evaluation + checkpoint.

Rerunning the same command in the same workdir resumes (step, parameters, optimizer state, rng
and the data iterator's position), so a resumed run ends where an uninterrupted one does, bit
for bit, wherever the first one was killed (tests/test_reliability_resume.py). SIGTERM or
SIGINT stops it at the next step boundary with that step's checkpoint saved (preemption.py).
One run holds a workdir at a time (workdir_lock.py); a damaged latest checkpoint is named and
the newest intact one resumed; a rerun whose trainable set, optimizer or data workers differ
from the saved state's is refused; a start that fails leaves the workdir as it was.

A non-finite loss, gradient norm or updated parameter stops the run naming the step, with the
last good checkpoint intact (config.on_nonfinite="stop"), or drops that step's update and
counts it in `train/skipped_steps` ("skip"): no checkpoint ever holds a NaN.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import numpy as np
from absl import logging

from valign_jax import checkpointing, frozen_towers, objectives, optim, peft, sharding
from valign_jax.config_checks import check_config
from valign_jax.data import feature_cache, pipeline, pixels
from valign_jax.evaluation.build import make_evaluator
from valign_jax.models.layout import abstract_params
from valign_jax.recipes import load_config
from valign_jax.run_setup import (build_model, image_size, initial_params, input_setup,
                                  report_unknown_tokens)
from valign_jax.train_step import create_state, make_train_step
from valign_jax.preemption import Preempted, Preemption
from valign_jax.workdir import MetricsLog, RunDirectory, state_layout, write_run_files


@dataclasses.dataclass
class Trainer:
    """Everything compiled for one model on one mesh: what the loop and the tests drive."""
    model: object
    objective: objectives.Objective
    labels: dict
    optimizer: object
    abstract_params: dict
    param_sh: dict            # NamedSharding per parameter
    state_sh: object          # ... and per TrainState leaf
    init_state: Callable      # params -> TrainState, placed on the mesh
    train_step: Callable      # (state, batch[, teacher]) -> (state, metrics); state donated

    @property
    def needs_teacher(self) -> bool:
        return "teacher" in self.objective.needs

    def abstract_state(self):
        """The state's shapes with their shardings: the target a checkpoint restores into."""
        shapes = jax.eval_shape(self.init_state, self.abstract_params)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, self.state_sh)


def make_trainer(config, model, mesh, total_steps: int, objective=None) -> Trainer:
    """Parameters, which of them train, the optimizer, where each array lives on the mesh,
    and the jitted step with explicit shardings. `objective`: config.objective's by default."""
    objective = objective or objectives.build(config.objective, mesh)
    shapes = abstract_params(model)
    labels = peft.make_labels(shapes, config.peft.recipe, config.peft.overrides)
    optimizer = optim.make_optimizer(config.optim, labels, total_steps)
    rng = jax.random.PRNGKey(config.seed)
    param_sh = sharding.tree_shardings(shapes, mesh, config.mesh.min_fsdp_size)
    state_shapes = jax.eval_shape(lambda p: create_state(p, optimizer, rng), shapes)
    state_sh = sharding.tree_shardings(state_shapes, mesh, config.mesh.min_fsdp_size)
    init_state = jax.jit(lambda p: create_state(p, optimizer, rng), in_shardings=(param_sh,),
                         out_shardings=state_sh)
    step_fn = make_train_step(model, optimizer, labels, objective, config.model.logit_preset,
                              skip_nonfinite=config.on_nonfinite == "skip",
                              micro_batches=config.micro_batches, mesh=mesh)
    batch_sh, out_sh = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    # A teacher (the frozen initial model) is a third argument, never a constant baked into
    # the compiled step.
    in_sh = (state_sh, batch_sh) + ((param_sh,) if "teacher" in objective.needs else ())
    train_step = jax.jit(step_fn, in_shardings=in_sh, out_shardings=(state_sh, out_sh),
                         donate_argnums=(0,))
    return Trainer(model, objective, labels, optimizer, shapes, param_sh, state_sh, init_state,
                   train_step)


def train_and_evaluate(config, workdir) -> dict:
    """Train per `config` in `workdir`; returns the final evaluation's metrics.

    Raises preemption.Preempted (after saving the step's checkpoint) when SIGTERM or SIGINT
    stopped the run."""
    check_config(config)  # every key and option, before any compute
    with RunDirectory(workdir) as run_dir:
        workdir = run_dir.path
        if config.get("pretrain"):
            config = _run_pretrain_stage(config, workdir)
        run = _start(config, workdir)
        write_run_files(workdir, config, run.model, state_layout(config, run.trainable))
        run_dir.started()
        return _run(config, workdir, run)


@dataclasses.dataclass
class _Run:
    """A run ready to train: everything `_start` builds."""
    model: object
    trainer: Trainer
    trainable: list           # paths of the trainable parameters
    train_iter: object
    train_source: object
    total_steps: int
    collate: object
    image_size: int
    evaluator: object
    mesh: object
    to_device: Callable       # the host's batch -> the global batch on the mesh


def _start(config, workdir) -> _Run:
    """The model, the data stream, the compiled step and the evaluators. Everything that can
    fail on the user's input fails here, before the run writes its files."""
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    sharding.check_batch_size(config.batch_size, mesh)
    cached = bool(config.data.get("feature_cache"))
    model = frozen_towers.cached_model(config, workdir) if cached else build_model(config)
    objective = objectives.build(config.objective, mesh)

    # Data: the training stream, and how captions and pixels become model inputs.
    second_caption = "second_caption" in objective.needs
    if cached:
        train_source = feature_cache.CachedFeatures(
            frozen_towers.cache_dir(config, "train", workdir))
        size, collate = input_setup(config, model, second_caption, workdir)
        train_data = pipeline.cached_train_dataset(train_source, config.batch_size, config.seed,
                                                   config.data.threads)
    else:
        train_source = pipeline.make_source(config.data.train, "train", config.data,
                                            image_size(config, model), "config.data.train")
        size, collate = input_setup(config, model, second_caption, workdir, train_source,
                                    labels="labels" in objective.needs)
        report_unknown_tokens(collate, train_source)
        train_data = pipeline.train_dataset(train_source, _training_collate(config, collate),
                                            config.batch_size,
                                            config.seed, config.data.threads,
                                            num_workers=config.data.workers)
    total_steps = config.total_steps or math.ceil(
        config.num_epochs * len(train_source) / config.batch_size)
    trainer = make_trainer(config, model, mesh, total_steps, objective)
    trainable = list(peft.split(trainer.abstract_params, trainer.labels)[0])
    evaluator = make_evaluator(config, model, mesh, trainer.param_sh, collate, size,
                               frozen_towers.cache_dir(config, "eval", workdir) if cached
                               else None,
                               frozen_towers.TowerFeatures(config, workdir, mesh) if cached
                               else None)
    normalizer = pixels.DeviceNormalizer(collate.mean, collate.std)
    return _Run(model, trainer, trainable, iter(train_data), train_source, total_steps,
                collate, size, evaluator, mesh,
                lambda local: normalizer(sharding.global_batch(local, mesh)))


def _training_collate(config, collate):
    """The training stream's Collate: uint8 pixels, normalised on the devices by the loop
    (config.data.normalize_on_device), else float32 ones as the evaluators get."""
    if not config.data.normalize_on_device:
        return collate
    return dataclasses.replace(collate, normalize_on_host=False)


def _run(config, workdir, run: _Run) -> dict:
    trainer, total_steps, evaluator = run.trainer, run.total_steps, run.evaluator
    report = peft.report(trainer.abstract_params, trainer.labels)
    logging.info("parameters:\n%s", report)
    if jax.process_index() == 0:
        (workdir / "parameters.txt").write_text(report + "\n")

    checkpoints = checkpointing.Checkpoints(workdir, config.keep_checkpoints,
                                            pipeline.iterator_handler())
    start = checkpoints.latest_intact_step() or 0  # a damaged latest one is named, set aside
    teacher = None
    if start == 0 or trainer.needs_teacher:
        params = initial_params(config, run.model, trainer.param_sh)
        if trainer.needs_teacher:  # the run's initial model, frozen
            teacher = params
    if start:
        state = checkpoints.restore(start, trainer.abstract_state(),
                                    pipeline.iterator_restore_args(run.train_iter))
        logging.info("resumed from %s at step %d", checkpoints.directory, start)
    else:
        state = trainer.init_state(params)

    log = MetricsLog(workdir, config, total_steps)
    log.broken_shards = len(getattr(run.train_source, "broken_shards", ()))
    log.resume_at(start)
    log.writer.write_texts(0, {"parameters": "    " + report.replace("\n", "\n    ")})
    # An evaluation due at the start that the log lacks: step 0 of a new run, or the one a
    # run killed right after its checkpoint never wrote (e.g. the final one).
    if evaluator.due(start, final=start >= total_steps) and log.last.get("step") != start:
        log.write(start, _evaluate(evaluator, state, start, final=start >= total_steps))
    finished = False
    try:
        with Preemption() as preemption:
            _train_loop(config, trainer, state, teacher, run.train_iter, run.to_device, start,
                        total_steps, checkpoints, evaluator, log, preemption)
        checkpoints.wait()  # the run reports success only once its last checkpoint is on disk
        finished = True
    finally:  # a crash still lets the checkpoint being written finish
        checkpoints.close()
        log.close(raise_errors=finished)
        close = getattr(run.train_iter, "close", None)
        if close is not None:  # grain's worker processes end with the run
            close()
    if start >= total_steps:
        logging.info("%s already holds the finished run (step %d)", workdir, start)
    return log.last


def _train_loop(config, trainer, state, teacher, train_iter, to_device, start, total_steps,
                checkpoints, evaluator, log, preemption):
    stop_on_nonfinite = config.on_nonfinite == "stop"  # "skip": the step itself drops them
    pending, previous = [], None
    for step in range(start, total_steps):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            local = next(train_iter)
            log.skipped += int(local.pop("skipped", np.zeros(1)).sum())
            batch = to_device(local)
            args = (state, batch) if teacher is None else (state, batch, teacher)
            state, metrics = trainer.train_step(*args)
        pending.append(metrics)
        if previous is not None and stop_on_nonfinite:
            _check_finite(*previous, checkpoints)  # one step behind: the device never waits
        previous = (step + 1, metrics)
        log.progress(step + 1)
        done = step + 1 == total_steps
        stop = preemption.reached(step + 1)
        if (step + 1) % config.log_every == 0 or done or stop:
            if stop_on_nonfinite:
                _check_finite(*previous, checkpoints)
            _log_train_metrics(log, step + 1, pending, state, not stop_on_nonfinite)
            pending = []
        if (step + 1) % config.checkpoint_every == 0 or done or stop:
            if stop_on_nonfinite:
                _check_finite(*previous, checkpoints)
            checkpoints.save(step + 1, state, pipeline.iterator_save_args(train_iter))
        if stop:
            checkpoints.wait()
            raise Preempted(preemption.signum, step + 1)
        if evaluator.due(step + 1, final=done):
            log.write(step + 1, _evaluate(evaluator, state, step + 1, final=done))


def _evaluate(evaluator, state, step: int, final: bool) -> dict:
    """The evaluators due at `step` (each on its own schedule)."""
    return {**evaluator(state.params, step, final),
            "train/skipped_steps": int(state.skipped_steps)}


def _log_train_metrics(log, step: int, pending: list, state, skipping: bool) -> None:
    """Means over the steps since the last log, of the steps that updated the model (a
    skipped step's NaN loss would hide every other), and, when skipping, the count of skipped
    steps so far."""
    values = jax.device_get(pending)
    kept = [{k: v for k, v in m.items() if k != "skipped"} for m in values
            if not m.get("skipped", 0)]
    if kept:
        log.train_metrics(step, kept)
    first = step - len(values) + 1
    skipped_now = [first + i for i, m in enumerate(values) if m.get("skipped", 0)]
    if skipped_now:
        logging.warning("training step(s) %s had a non-finite loss or gradient norm: their "
                        "updates were dropped (config.on_nonfinite='skip')", skipped_now)
    if skipping:
        log.writer.write_scalars(step, {"train/skipped_steps": int(state.skipped_steps)})


def _check_finite(step: int, metrics: dict, checkpoints) -> None:
    """Stop the run at the first non-finite loss or gradient; saved checkpoints stay intact."""
    values = {k: float(metrics[k]) for k in ("loss", "grad_norm", "param_norm")}
    if all(math.isfinite(v) for v in values.values()):
        return
    checkpoints.wait()
    last = checkpoints.latest_step()
    raise FloatingPointError(
        f"non-finite training values at step {step}: {values}. The run stopped; the last good "
        f"checkpoint is " + (f"step {last} in {checkpoints.directory}" if last else "none (it "
        f"failed before the first checkpoint)") + ". Lower config.optim.lr or set "
        f"config.optim.grad_clip_norm, then rerun to resume from it; or set "
        f"config.on_nonfinite='skip' to drop such steps' updates and count them.")


def _run_pretrain_stage(config, workdir):
    """Train `config.pretrain` (a config string) into <workdir>/pretrain first, then start this
    run from its result: how the CLIP-Refine demo gets a pretrained CLIP offline."""
    stage_config = load_config(config.pretrain)
    stage_dir = workdir / "pretrain"
    logging.info("pretraining stage %s in %s", config.pretrain, stage_dir)
    train_and_evaluate(stage_config, stage_dir)  # Preempted stops this run too
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.init_from = str(stage_dir)
        config.pretrain = ""
    return config
