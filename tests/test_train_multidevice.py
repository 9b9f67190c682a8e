"""The sharded train step on 8 simulated CPU devices equals the 1-device run.

Mesh data=4 × fsdp=2, with the fsdp threshold lowered so the tiny towers' kernels really are
split over `fsdp`. The child process (XLA reads the device-count flag only before jax is
imported) runs 5 steps of each recipe on one device and on the mesh, from the same starting
parameters and the same batches, and prints the losses as JSON; the assertions live here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

CHILD = r"""
import json, sys
import jax
from valign_jax import sharding, train
from valign_jax.data import pipeline
from valign_jax.run_setup import build_model, initial_params, input_setup
sys.path.insert(0, "tests")
from train_helpers import tiny_config

out = {"devices": jax.device_count()}
for recipe, arg in (("clip", "demo"), ("siglip", "chunked,demo")):
    config = tiny_config(recipe, arg, steps=5, batch_size=16)
    config.mesh.min_fsdp_size = 256
    model = build_model(config)
    collate = input_setup(config, model)[1]
    source = pipeline.make_source(config.data.train, "train", config.data,
                                  model.image_config.image_size, "config.data.train")
    stream = iter(pipeline.train_dataset(source, collate, config.batch_size, config.seed))
    batches = [next(stream) for _ in range(5)]
    meshes = {"one": sharding.make_mesh(1, 1, jax.devices()[:1]), "mesh": sharding.make_mesh(4, 2)}
    for name, mesh in meshes.items():
        trainer = train.make_trainer(config, model, mesh, total_steps=5)
        state = trainer.init_state(initial_params(config, model, trainer.param_sh))
        losses = []
        for batch in batches:
            state, metrics = trainer.train_step(state, sharding.global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
        out[f"{recipe}/{name}"] = losses
        out[f"{recipe}/{name}/fsdp_split"] = sum(
            "fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params))
        out[f"{recipe}/{name}/opt_split"] = sum(
            "fsdp" in str(getattr(leaf, "sharding", "")) for leaf in jax.tree.leaves(state.opt_state))

try:
    sharding.check_batch_size(12, sharding.make_mesh(4, 2))
except ValueError as err:
    out["batch_error"] = str(err)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def child():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("recipe", ["clip", "siglip"])
def test_first_five_losses_on_the_mesh_equal_one_device(child, recipe):
    assert child["devices"] == 8
    one, mesh = np.asarray(child[f"{recipe}/one"]), np.asarray(child[f"{recipe}/mesh"])
    assert len(one) == 5 and np.all(np.isfinite(one))
    assert one[-1] < one[0], "the run learns"
    np.testing.assert_allclose(mesh, one, atol=1e-4, rtol=0)
    # fsdp really split parameters and their Adam moments on the mesh, and nothing on 1 device
    assert child[f"{recipe}/mesh/fsdp_split"] > 10
    assert child[f"{recipe}/mesh/opt_split"] >= 2 * child[f"{recipe}/mesh/fsdp_split"]
    assert child[f"{recipe}/one/fsdp_split"] == 0


def test_batch_not_divisible_by_the_data_parallel_size_names_both(child):
    message = child["batch_error"]
    assert "config.batch_size=12" in message and "data-parallel size 8" in message
