"""Checkpoints of a run: the train state and the data iterator's position, with orbax.

    <workdir>/checkpoints/<step>/state   step, params, optimizer state, rng (sharded arrays)
    <workdir>/checkpoints/<step>/data    the input pipeline's iterator state, one file per process
    <workdir>/model.json                 the dual encoder's architecture (load_trained rebuilds it)
    <workdir>/config.json                the run's config

    <workdir>/checkpoints/<step>/valign_manifest.json   size + SHA-256 of every file above

Saving is asynchronous (training continues while the arrays are written) and atomic: orbax
writes into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` when complete (on
GCS, where renames are not atomic, a `commit_success.txt` marks it complete), so a run killed
mid-save leaves the previous checkpoint as the latest; the next run deletes the half-written
directory. Only the last `keep` checkpoints are kept, and older ones are deleted only after a
newer one is complete. A save that fails (disk full, directory made unwritable) stops the run
with a `CheckpointWriteError` naming the step and the checkpoint that is still intact.

Once orbax has committed a checkpoint, a background thread hashes its files into the manifest
(checkpoint_integrity.py). On resume, `latest_intact_step` checks the checkpoints newest first
against their manifests: a damaged one (a changed byte, a file cut short, `state/` or
`_METADATA` gone) is named in one log line and moved aside, and the newest intact one is used.
`restore_params` (load_trained, evaluate) falls back the same way, without moving anything.
"""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from valign_jax import checkpoint_integrity, storage

CHECKPOINTS = "checkpoints"
MODEL_JSON = "model.json"
CONFIG_JSON = "config.json"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the step and what is still intact."""


class CheckpointDamagedError(ValueError):
    """A checkpoint asked for by step does not hold what was written; the message says what."""


class Checkpoints:
    """The checkpoints of one workdir, as the training run writes them. `data_handler`: the
    input pipeline's orbax handler (grain's), when the iterator position is saved too."""

    def __init__(self, workdir, keep: int = 3, data_handler=None, async_save: bool = True):
        self.directory = storage.path(workdir) / CHECKPOINTS
        handlers = {"state": ocp.StandardCheckpointHandler()}
        if data_handler is not None:
            handlers["data"] = data_handler
        # cleanup_tmp_directories: a killed run's half-written checkpoint (as big as a whole
        # one) is deleted when the next run starts, so preemptions do not fill the disk.
        # Directories are made before `save` returns: made in the background, a failure
        # (unwritable directory) left orbax's writers waiting out a timeout, then reporting it
        # instead of the cause.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=handlers)
        self.items = tuple(handlers)
        self._writing = None  # the step whose save may still be running in the background
        self._finishing = None  # the thread waiting for that save, then writing its manifest
        self._failure = None    # what that save raised, reported by `wait`

    def latest_step(self) -> int | None:
        """The newest complete checkpoint; half-written ones are never listed. It may still be
        damaged: a run resumes from `latest_intact_step`."""
        return self.manager.latest_step()

    def latest_intact_step(self) -> int | None:
        """The newest checkpoint that still holds what was written (checked against its
        manifest); None when there is no checkpoint. Newer, damaged ones are reported (one
        error line each, naming the step and what is wrong) and moved aside to
        <step>.damaged, so the run writes those steps again. When checkpoints exist but none
        is intact: CheckpointDamagedError, nothing moved (starting over is the user's call).
        With several processes every one must call this: process 0 checks and moves, the
        others receive its answer."""
        if jax.process_count() == 1:
            return self._newest_intact()
        from jax.experimental import multihost_utils
        chosen, error = -1, None
        if jax.process_index() == 0:
            try:
                step = self._newest_intact()
                chosen = -1 if step is None else step
            except CheckpointDamagedError as err:
                chosen, error = -2, err
        chosen = int(multihost_utils.broadcast_one_to_all(np.int64(chosen)))
        if error is not None:
            raise error
        if chosen == -2:
            raise CheckpointDamagedError(f"{self.directory}: process 0 found no intact "
                                         f"checkpoint (its log names what is wrong)")
        self.manager.reload()  # process 0 may have moved damaged checkpoints aside
        return None if chosen < 0 else chosen

    def _newest_intact(self) -> int | None:
        self.manager.reload()
        steps = self.manager.all_steps()
        step, reports = checkpoint_integrity.newest_intact(self.directory, steps, self.items,
                                                           move_damaged=True)
        if step is None and reports:
            raise CheckpointDamagedError(
                f"none of the checkpoints in {self.directory} is intact ({'; '.join(reports)}). "
                f"Nothing was moved; to start this run over, move {self.directory} away")
        if reports:
            self.manager.reload()
        return step

    def save(self, step: int, state, data_args=None) -> None:
        """Start saving `state` (and `data_args`, e.g. grain.checkpoint.CheckpointSave(it)).
        Raises CheckpointWriteError if this save or the previous one cannot be written."""
        self.wait()  # a failure of the previous save is reported as that step's
        items = {"state": ocp.args.StandardSave(state)}
        if data_args is not None:
            items["data"] = data_args
        self._writing = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:  # noqa: BLE001  (whatever the storage raised, said plainly)
            self._writing = None
            raise self._write_error(step, err) from err
        self._finishing = threading.Thread(target=self._finish, args=(step,), daemon=True,
                                           name=f"checkpoint-{step}-manifest")
        self._finishing.start()

    def _finish(self, step: int) -> None:
        """In the background: wait for orbax to commit `step`, then (process 0) hash its files
        into the manifest. A failed save is kept for `wait` to report; a manifest that cannot
        be written only costs the byte check of that checkpoint (a warning)."""
        try:
            self.manager.wait_until_finished()
        except BaseException as err:  # noqa: BLE001  (reported by wait, in the caller's thread)
            self._failure = err
            return
        if jax.process_index() != 0:
            return
        try:
            checkpoint_integrity.write_manifest(self.directory / str(step), step)
        except Exception as err:  # noqa: BLE001
            logging.warning("could not write the manifest of checkpoint %d (%s): it will be "
                            "checked by structure only", step, err)

    def restore(self, step: int, abstract_state, data_args=None):
        """The state at `step`, placed per the shardings in `abstract_state`
        (jax.ShapeDtypeStruct leaves with .sharding); restores the iterator in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_args is not None:
            items["data"] = data_args
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
        except ValueError as err:  # orbax's message names the first array that differs
            raise ValueError(f"{self.directory / str(step)} does not fit this run's train "
                             f"state or data pipeline, or cannot be read ({str(err)[:500]}); "
                             f"if another version of valign_jax wrote it, use a new "
                             f"--workdir") from err

    def wait(self) -> None:
        """Block until every started save is on disk (and its manifest written);
        CheckpointWriteError if one failed."""
        step, self._writing = self._writing, None
        finishing, self._finishing = self._finishing, None
        if finishing is not None:
            finishing.join()
        failure, self._failure = self._failure, None
        try:
            if failure is not None:
                raise failure
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._write_error(step, err) from err

    def close(self) -> None:
        """Let a save in flight finish, then release orbax. Failures are logged here, never
        raised: the caller's own exception (the reason it is closing) must not be masked, and a
        run that succeeded has called `wait`, which raises them."""
        try:
            self.wait()
        except CheckpointWriteError as err:
            logging.error("%s", err)
        try:
            self.manager.close()
        except Exception as err:  # noqa: BLE001
            logging.error("closing the checkpoints in %s: %s", self.directory, err)

    def _write_error(self, step, err: Exception) -> CheckpointWriteError:
        try:
            self.manager.reload()  # orbax forgot the steps it meant to replace; the disk knows
            intact = self.manager.latest_step()
            kept = (f"the previous checkpoint, step {intact}, is intact" if intact is not None
                    else "there is no earlier checkpoint")
        except Exception as list_err:  # noqa: BLE001  (the directory itself may be gone)
            kept = f"listing the earlier checkpoints failed too ({list_err})"
        cause = storage.root_os_error(err) or err
        error = CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {self.directory}: {cause}. "
            f"The run stopped; {kept}. Free disk space or make the directory writable, then "
            f"rerun the same command to resume.")
        error.errno = getattr(cause, "errno", None)
        return error


def restore_params(workdir, step: int | None = None):
    """(params as host NumPy arrays, step) of a run's checkpoint; by default the newest intact
    one (damaged newer ones are logged, one line each, and left where they are). A `step`
    asked for that is damaged is a CheckpointDamagedError naming what is wrong.

    Reads the parameters only: the optimizer state stays on disk.
    """
    directory = storage.path(workdir) / CHECKPOINTS
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no checkpoints (is {workdir} a training workdir?)")
    # "data" (the iterator position) is registered so orbax knows the item, never read here.
    with ocp.CheckpointManager(directory, item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler()}) as manager:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{directory}: no finished checkpoint")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{directory}: no checkpoint at step {step}; have "
                                    f"{sorted(steps)}")
        asked, (step, reports) = step, checkpoint_integrity.newest_intact(
            directory, [step] if step is not None else steps)
        if step is None:
            raise CheckpointDamagedError(
                f"{reports[0]}; other checkpoints: {sorted(set(steps) - {asked})}"
                if asked is not None else
                f"{directory}: none of its checkpoints {sorted(steps)} is intact: "
                f"{'; '.join(reports)}")
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
    path = storage.path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    tmp.replace(path)
