"""Checkpoints of a run: the train state and the data iterator's position, with orbax.

    <workdir>/checkpoints/<step>/state   step, params, optimizer state, rng (sharded arrays)
    <workdir>/checkpoints/<step>/data    the input pipeline's iterator state, one file per process
    <workdir>/model.json                 the dual encoder's architecture (load_trained rebuilds it)
    <workdir>/config.json                the run's config

Saving is asynchronous (training continues while the arrays are written) and atomic: orbax
writes into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoint as the latest. Only the last `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"
MODEL_JSON = "model.json"
CONFIG_JSON = "config.json"


class Checkpoints:
    """The checkpoints of one workdir. `data_handler`: the input pipeline's orbax handler
    (grain's), when the iterator position is saved too."""

    def __init__(self, workdir, keep: int = 3, data_handler=None, async_save: bool = True):
        self.directory = Path(workdir).absolute() / CHECKPOINTS
        handlers = {"state": ocp.StandardCheckpointHandler()}
        if data_handler is not None:
            handlers["data"] = data_handler
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_args=None) -> None:
        """Start saving `state` (and `data_args`, e.g. grain.checkpoint.CheckpointSave(it))."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_args is not None:
            items["data"] = data_args
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, data_args=None):
        """The state at `step`, placed per the shardings in `abstract_state`
        (jax.ShapeDtypeStruct leaves with .sharding); restores the iterator in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_args is not None:
            items["data"] = data_args
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_params(workdir, step: int | None = None):
    """(params as host NumPy arrays, step) of a run's checkpoint; latest by default.

    Reads the parameters only: the optimizer state stays on disk.
    """
    directory = Path(workdir).absolute() / CHECKPOINTS
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints (is {workdir} a training workdir?)")
    # "data" (the iterator position) is registered so orbax knows the item, never read here.
    with ocp.CheckpointManager(directory, item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler()}) as manager:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{directory}: no finished checkpoint")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; have {sorted(steps)}")
        metadata = manager.item_metadata(step)["state"]
        tree = metadata.tree if hasattr(metadata, "tree") else metadata
        target = {"params": jax.tree.map(_host_restore_target, tree["params"])}
        args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                      restore_args=jax.tree.map(
                                          lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          target))
        restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
    return restored["params"], step


def _host_restore_target(meta):
    return np.zeros(meta.shape, meta.dtype)


def write_json(path, value) -> None:
    """Write JSON atomically (temp file + rename), from the first process only."""
    if jax.process_index() != 0:
        return
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    tmp.replace(path)
