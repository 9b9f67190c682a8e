"""The training loop end to end, as `python -m valign_jax.main` runs it: one real run of every
recipe's config on tiny settings, resuming after a crash, and stopping on a non-finite loss."""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

import valign_jax
from valign_jax import frozen_towers, peft, sharding, train
from valign_jax.models.layout import abstract_params
from valign_jax.recipes import load_config
from valign_jax.run_setup import build_model, initial_params

from train_helpers import RECIPES, shrink, tiny_config

EVAL_KEYS = ("retrieval/i2t_r1", "retrieval/t2i_r10", "zeroshot/synthetic/top1",
             "zeroshot/synthetic/top5", "geometry/gap", "geometry/gap_sq_per_dim",
             "geometry/alignment", "geometry/uniformity")


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def flat(params):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def starting_params(config, workdir):
    """The parameters the run started from, rebuilt independently of the loop."""
    if config.pretrain:  # clip_refine:demo starts from its pretraining stage's result
        return valign_jax.load_trained(workdir / "pretrain")[1]
    model = (frozen_towers.cached_model(config, workdir) if config.data.feature_cache
             else build_model(config))
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    shardings = sharding.tree_shardings(abstract_params(model, **model.dummy_inputs()), mesh)
    return jax.device_get(initial_params(config, model, shardings))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_a_real_step(recipe, tmp_path, monkeypatch):
    config = tiny_config(recipe)
    if config.pretrain:  # the CLIP-Refine demo's pretraining stage, shrunk the same way
        monkeypatch.setattr(train, "load_config", lambda spec: shrink(load_config(spec)))
    final = train.train_and_evaluate(config, tmp_path)

    lines = read_metrics(tmp_path)
    assert [m["step"] for m in lines] == [0, 2]
    # Every recipe with zero-shot data reports it, SAIL's from cached features too; the
    # fusion demo's relations data has no classes, and its model re-ranks and reports the
    # compositional metrics of both scores.
    keys = [k for k in EVAL_KEYS if config.eval.zeroshot or "zeroshot" not in k]
    if config.model.fusion_layers:
        keys += ["retrieval_reranked/i2t_r1", "retrieval_reranked/t2i_r10",
                 "compositional/relations/group", "compositional_reranked/relations/accuracy"]
    for key in keys:
        assert all(np.isfinite(m[key]) for m in lines), key
    assert np.isfinite(lines[-1]["train/loss"]) and final == lines[-1]
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert "trainable" in (tmp_path / "parameters.txt").read_text()

    # The recipe decides what moved: frozen parameters are bit-identical to where the run
    # started, and trainable ones changed.
    model, params, saved_config = valign_jax.load_trained(tmp_path)
    assert saved_config.peft.recipe == config.peft.recipe
    labels = peft.make_labels(params, config.peft.recipe, config.peft.overrides)
    trainable, frozen = (dict(zip(("/".join(k) for k in part), part.values()))
                         for part in peft.split(params, labels))
    start = flat(starting_params(config, tmp_path))
    assert trainable, "every recipe trains something"
    for name, value in frozen.items():
        np.testing.assert_array_equal(value, start[name], err_msg=name)
    moved = [name for name, value in trainable.items() if not np.array_equal(value, start[name])]
    assert len(moved) >= 0.9 * len(trainable), sorted(set(trainable) - set(moved))


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    config = tiny_config("clip", steps=6)
    config.checkpoint_every = 2
    train.train_and_evaluate(config, tmp_path / "straight")

    # Crash while fetching the 5th training batch: checkpoints 2 and 4 are on disk.
    real_global_batch, calls = sharding.global_batch, []

    def crashing(local, mesh):
        if {"pixel_values", "input_ids"} <= set(local):  # training batches only
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("simulated crash")
        return real_global_batch(local, mesh)
    monkeypatch.setattr(sharding, "global_batch", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_and_evaluate(config, tmp_path / "resumed")
    monkeypatch.setattr(sharding, "global_batch", real_global_batch)
    assert sorted(p.name for p in (tmp_path / "resumed/checkpoints").iterdir()) == ["2", "4"]

    final = train.train_and_evaluate(config, tmp_path / "resumed")  # the same command again
    straight = valign_jax.load_trained(tmp_path / "straight")[1]
    resumed = valign_jax.load_trained(tmp_path / "resumed")[1]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(straight),
                            jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    # train/loss averages the steps since the last log, which the crash cut short; every
    # evaluation metric agrees.
    expected = read_metrics(tmp_path / "straight")[-1]
    assert {k: v for k, v in final.items() if k != "train/loss"} == {
        k: v for k, v in expected.items() if k != "train/loss"}


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                          monkeypatch):
    """Step 3's batch gets NaN pixels (checkpoints every 2 steps): the run stops with a
    FloatingPointError naming step 3 and checkpoint 2; only checkpoint 2 exists, and it loads
    with finite parameters."""
    config = tiny_config("clip", steps=6)
    config.checkpoint_every = 2
    real_global_batch, calls = sharding.global_batch, []

    def corrupt_third_batch(local, mesh):
        if {"pixel_values", "input_ids"} <= set(local):
            calls.append(1)
            if len(calls) == 3:  # step 3's batch carries NaN pixels
                local = {**local, "pixel_values": np.full_like(local["pixel_values"], np.nan)}
        return real_global_batch(local, mesh)
    monkeypatch.setattr(sharding, "global_batch", corrupt_third_batch)
    with pytest.raises(FloatingPointError, match="step 3") as err:
        train.train_and_evaluate(config, tmp_path)
    assert "last good checkpoint is step 2" in str(err.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["2"]
    params = valign_jax.load_trained(tmp_path)[1]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_pixels_normalised_on_the_devices_train_as_host_normalised_ones(tmp_path, monkeypatch):
    """Training batches leave the host as uint8 by default and are normalised on the devices;
    the run is the same, bit for bit, as one whose host normalises them."""
    real_global_batch, host_dtypes = sharding.global_batch, []

    def recording(local, mesh):
        if {"pixel_values", "input_ids"} <= set(local):
            host_dtypes.append(local["pixel_values"].dtype)
        return real_global_batch(local, mesh)
    monkeypatch.setattr(sharding, "global_batch", recording)
    runs = {}
    for on_device in (True, False):
        config = tiny_config("clip", steps=2)
        config.data.normalize_on_device = on_device
        host_dtypes.clear()
        train.train_and_evaluate(config, tmp_path / str(on_device))
        assert set(host_dtypes) == {np.dtype(np.uint8) if on_device else np.dtype(np.float32)}
        runs[on_device] = valign_jax.load_trained(tmp_path / str(on_device))[1]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(runs[True]),
                            jax.tree.leaves(runs[False])):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert read_metrics(tmp_path / "True") == read_metrics(tmp_path / "False")
