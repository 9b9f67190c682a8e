"""Checkpoints are checked against what was written before a run resumes from them
(valign_jax/checkpoint_integrity.py, checkpointing.py): a changed byte, a file cut short, a
removed `state/` or `_METADATA` in the latest checkpoint is named in one error line and the
newest intact checkpoint is used, bit for bit as it was saved, data position included.

The checkpoints are written the way the training loop writes them (checkpointing.Checkpoints,
asynchronous saves, the grain iterator's position as the "data" item), of a small state: a
4096-float parameter vector (random, so its compressed bytes are its own), a bias and a step.
"""

import hashlib
import json
import logging
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from valign_jax import checkpoint_integrity, checkpointing

STEPS = (2, 4, 6)


def state_at(step):
    rng = np.random.default_rng(step)
    return {"step": jnp.asarray(step, jnp.int32),
            "params": {"w": jnp.asarray(rng.standard_normal(4096), jnp.float32),
                       "b": jnp.full((8,), float(step), jnp.float32)}}


def data_iterator():
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


def open_checkpoints(workdir):
    return checkpointing.Checkpoints(workdir, keep=3,
                                     data_handler=grain.checkpoint.CheckpointHandler())


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A workdir with checkpoints 2, 4, 6; the data iterator had yielded `step` elements."""
    workdir = tmp_path_factory.mktemp("written")
    checkpoints, it = open_checkpoints(workdir), data_iterator()
    for step in STEPS:
        while next(it) < step - 1:
            pass
        checkpoints.save(step, state_at(step), grain.checkpoint.CheckpointSave(it))
    checkpoints.close()
    return workdir


@pytest.fixture
def workdir(written, tmp_path):
    shutil.copytree(written, tmp_path / "run")
    return tmp_path / "run"


def step_dir(workdir, step):
    return workdir / "checkpoints" / str(step)


def largest_array_file(workdir, step):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir(workdir, step) / "state")
             for f in fs]
    return max(files, key=os.path.getsize)


def abstract(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def restore(checkpoints, step):
    """(state, the next element the data iterator yields) of checkpoint `step`."""
    it = data_iterator()
    state = checkpoints.restore(step, abstract(state_at(step)),
                                grain.checkpoint.CheckpointRestore(it))
    return state, next(it)


def assert_same(a, b):
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a),
                                 jax.tree_util.tree_leaves_with_path(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------


def test_every_committed_checkpoint_has_a_manifest_of_its_files(written):
    """After asynchronous saves and close(): each step's manifest lists every file of the
    checkpoint (state, data, orbax's metadata) with its size and a SHA-256 computed here
    independently."""
    for step in STEPS:
        directory = step_dir(written, step)
        manifest = json.loads((directory / checkpoint_integrity.MANIFEST).read_text())
        on_disk = sorted(os.path.relpath(os.path.join(r, f), directory)
                         for r, _, fs in os.walk(directory) for f in fs)
        assert sorted(manifest["files"]) == [
            f for f in on_disk if f != checkpoint_integrity.MANIFEST]
        assert any(f.startswith("state/") for f in on_disk)
        assert "data/process_0-of-1.json" in on_disk
        for name, (size, sha256) in manifest["files"].items():
            data = (directory / name).read_bytes()
            assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert manifest["step"] == step


def flip_a_bit(workdir, step):
    """One bit of the parameter array's compressed bytes; orbax alone restores it silently
    as another value (asserted), which is what the manifest is there to catch."""
    file = largest_array_file(workdir, step)
    data = bytearray(open(file, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(file, "wb").write(data)
    plain = ocp.PyTreeCheckpointer().restore(step_dir(workdir, step) / "state")
    changed = np.asarray(plain["params"]["w"]) != np.asarray(state_at(step)["params"]["w"])
    # How many values one bit reaches depends on where it lands in the compressed stream
    # (which file orbax wrote the array to varies): at least one, silently.
    assert changed.any(), "the flipped bit changes a value and nothing complains"
    return "has changed since it was written (SHA-256 differs)"


def truncate(workdir, step):
    file = largest_array_file(workdir, step)
    size = os.path.getsize(file)
    os.truncate(file, size // 2)
    return f"is {size // 2} bytes, {size} when written (truncated)"


def remove_state(workdir, step):
    shutil.rmtree(step_dir(workdir, step) / "state")
    return "state/ is missing"


def remove_metadata(workdir, step):
    os.remove(step_dir(workdir, step) / "state" / "_METADATA")
    return "state/_METADATA is missing"


@pytest.mark.parametrize("damage", [flip_a_bit, truncate, remove_state, remove_metadata],
                         ids=["flipped_bit", "truncated", "no_state", "no_METADATA"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumes(
        workdir, damage, caplog):
    """Damage checkpoint 6, then resume as the loop does. Asserts: latest_step() still says 6
    (orbax sees nothing wrong) but latest_intact_step() is 4; one error line names checkpoint
    6 and what is wrong; 6 was moved to 6.damaged; checkpoint 4 restores bit for bit with the
    data iterator where it was at step 4; the run can write step 6 again."""
    expected = damage(workdir, 6)
    checkpoints = open_checkpoints(workdir)
    assert checkpoints.latest_step() == 6
    with caplog.at_level(logging.WARNING):
        assert checkpoints.latest_intact_step() == 4
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"checkpoint 6 in {workdir / 'checkpoints'} is damaged: ")
    assert expected in errors[0] and errors[0].endswith("moved to 6.damaged")
    assert "using checkpoint 4, the newest intact one" in caplog.text
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6.damaged"]

    state, next_element = restore(checkpoints, 4)
    assert_same(state, state_at(4))
    assert next_element == 4
    it = data_iterator()
    checkpoints.save(6, state_at(6), grain.checkpoint.CheckpointSave(it))
    checkpoints.close()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6", "6.damaged"]
    assert open_checkpoints(workdir).latest_intact_step() == 6


def test_an_intact_latest_checkpoint_is_used_without_a_word(workdir, caplog):
    checkpoints = open_checkpoints(workdir)
    with caplog.at_level(logging.WARNING):
        assert checkpoints.latest_intact_step() == 6
    assert caplog.records == []
    assert_same(restore(checkpoints, 6)[0], state_at(6))


def test_a_checkpoint_without_manifest_is_checked_by_structure(workdir, caplog):
    """The run died between orbax's commit of 6 and its manifest. Asserts: 6 is used, with a
    warning that only its structure was checked, and it restores; without a manifest and
    without state/, 6 is named damaged and 4 is used."""
    os.remove(step_dir(workdir, 6) / checkpoint_integrity.MANIFEST)
    checkpoints = open_checkpoints(workdir)
    assert checkpoints.latest_intact_step() == 6
    assert "checkpoint 6 in" in caplog.text and "only its structure was checked" in caplog.text
    assert_same(restore(checkpoints, 6)[0], state_at(6))

    shutil.rmtree(step_dir(workdir, 6) / "state")
    caplog.clear()
    assert open_checkpoints(workdir).latest_intact_step() == 4
    assert "checkpoint 6" in caplog.text and "state/ is missing or empty" in caplog.text


def test_with_no_intact_checkpoint_nothing_is_moved_and_the_error_names_each(workdir):
    for step in STEPS:
        truncate(workdir, step)
    with pytest.raises(checkpointing.CheckpointDamagedError) as err:
        open_checkpoints(workdir).latest_intact_step()
    message = str(err.value)
    assert all(f"checkpoint {s} in" in message for s in STEPS) and "truncated" in message
    assert "move" in message and sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]


def test_restore_params_falls_back_and_says_which_step_without_moving_anything(
        workdir, caplog):
    """What load_trained and `evaluate` call. Checkpoint 6 flipped: the default is step 4's
    parameters (logged: 6 damaged, 4 used), 6 stays where it is (reading never changes a
    workdir); asking for step 6 is a CheckpointDamagedError naming it and what is wrong."""
    flip_a_bit(workdir, 6)
    params, step = checkpointing.restore_params(workdir)
    assert step == 4
    assert_same(params, state_at(4)["params"])
    assert "checkpoint 6" in caplog.text and "using checkpoint 4" in caplog.text
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
    with pytest.raises(checkpointing.CheckpointDamagedError,
                       match=r"checkpoint 6 in .* is damaged: .*SHA-256 differs.*"
                             r"other checkpoints: \[2, 4\]"):
        checkpointing.restore_params(workdir, 6)
    assert checkpointing.restore_params(workdir, 2)[1] == 2


def test_where_folders_cannot_be_renamed_the_damaged_checkpoint_is_deleted(
        workdir, monkeypatch, caplog):
    """A store that cannot rename folders (the rename raises): the damaged checkpoint 6 is
    deleted instead, the log says so, and checkpoint 4 is used."""
    truncate(workdir, 6)
    checkpoints = open_checkpoints(workdir)

    def cannot(self, target):
        raise NotImplementedError("no folder renames here")
    monkeypatch.setattr(type(checkpoints.directory), "rename", cannot)
    assert checkpoints.latest_intact_step() == 4
    assert "deleted (it could not be moved aside: no folder renames here)" in caplog.text
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
