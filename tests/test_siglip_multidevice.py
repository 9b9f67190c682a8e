"""Fine-tuning a SigLIP checkpoint on 8 simulated CPU devices equals 1 device.

In a child process (XLA reads the device-count flag only before jax is imported): the ring-
chunked sigmoid loss on the tiny demo SigLIP checkpoint's own features, logit scale and bias,
sharded over 8 devices, against the plain loss on one device (value and every gradient); then
`configs/siglip.py:finetune,demo` with the chunked loss for 4 steps on a data=4 × fsdp=2 mesh
against one device, from the checkpoint's parameters and on the same batches (losses, the
logit scale and bias, and the update of all parameters). The child prints JSON; the assertions live here.
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
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from valign_jax import hf, losses, ring_losses, sharding, train
from valign_jax.data import pipeline
from valign_jax.run_setup import build_model, initial_params, input_setup
sys.path.insert(0, "tests")
from train_helpers import tiny_config

out = {"devices": jax.device_count()}
config = tiny_config("siglip", "finetune,demo", steps=4, batch_size=16)
config.objective.chunked = True
config.mesh.min_fsdp_size = 256
model = build_model(config)
collate = input_setup(config, model)[1]   # the checkpoint's tokenizer, as a run uses it
source = pipeline.make_source(config.data.train, "train", config.data,
                              model.image_config.image_size, "config.data.train")
stream = iter(pipeline.train_dataset(source, collate, config.batch_size, config.seed))
batches = [next(stream) for _ in range(4)]

# 1. The chunked loss on the checkpoint's features, scale and bias vs the plain loss.
_, ckpt = hf.load_dual_encoder(config.model.init_from)
feats = model.apply({"params": ckpt}, batches[0]["pixel_values"], batches[0]["input_ids"],
                    batches[0]["attention_mask"])
unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
args = (unit(feats["image"]), unit(feats["text"]), jnp.exp(ckpt["logit_scale"]), ckpt["logit_bias"])
one = jax.value_and_grad(lambda *a: losses.sigmoid(*a, norm="batch"), (0, 1, 2, 3))(
    *[jax.device_put(a, jax.devices()[0]) for a in args])
mesh8 = sharding.make_mesh(8, 1)
rows, rep = NamedSharding(mesh8, P(sharding.BATCH_AXES)), NamedSharding(mesh8, P())
ring = jax.jit(jax.value_and_grad(lambda *a: ring_losses.chunked_sigmoid(
    *a, mesh=mesh8, axis_name=sharding.BATCH_AXES, norm="batch"), (0, 1, 2, 3)))(
    *[jax.device_put(a, s) for a, s in zip(args, (rows, rows, rep, rep))])
out["loss_one"], out["loss_ring"] = float(one[0]), float(ring[0])
host = lambda tree: [np.asarray(x, np.float64) for x in jax.device_get(tree)]
out["grad_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(host(one[1]), host(ring[1])))
out["grad_scale"] = max(float(np.max(np.abs(a))) for a in host(one[1]))

# 2. Fine-tuning steps from the checkpoint: one device vs the 4 x 2 mesh.
final = {}
for name, mesh in {"one": sharding.make_mesh(1, 1, jax.devices()[:1]),
                   "mesh": sharding.make_mesh(4, 2)}.items():
    trainer = train.make_trainer(config, model, mesh, total_steps=4)
    state = trainer.init_state(initial_params(config, model, trainer.param_sh))
    start = jax.tree.leaves(jax.device_get(state.params))
    out[f"{name}/start_bias"] = float(jax.device_get(state.params["logit_bias"]))
    out[f"{name}/losses"] = []
    for batch in batches:
        state, metrics = trainer.train_step(state, sharding.global_batch(batch, mesh))
        out[f"{name}/losses"].append(float(metrics["loss"]))
    final[name] = jax.tree.leaves(jax.device_get(state.params))
    out[f"{name}/logits"] = [float(jax.device_get(state.params[k]))
                             for k in ("logit_scale", "logit_bias")]
    out[f"{name}/fsdp_split"] = sum("fsdp" in str(l.sharding.spec)
                                    for l in jax.tree.leaves(state.params))
# Adam turns float noise in near-zero gradients into full-size steps of either sign, so the
# updates are compared as a whole: |Δ_mesh - Δ_one| / |Δ_one| over every parameter.
norm = lambda xs: float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in xs)))
out["update_norm"] = norm([a - b for a, b in zip(final["one"], start)])
out["update_diff"] = norm([a - b for a, b in zip(final["one"], final["mesh"])])
out["ckpt_bias"] = float(ckpt["logit_bias"])
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "VALIGN_JAX_DEMO_DIR": str(tmp_path_factory.mktemp("demo_checkpoints"))}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_chunked_sigmoid_on_the_checkpoint_matches_one_device(child):
    assert child["devices"] == 8
    assert child["loss_ring"] == pytest.approx(child["loss_one"], rel=1e-5)
    assert child["grad_diff"] <= 1e-5 * max(1.0, child["grad_scale"])


def test_fine_tuning_steps_on_the_mesh_equal_one_device(child):
    one, mesh = np.asarray(child["one/losses"]), np.asarray(child["mesh/losses"])
    assert len(one) == 4 and np.all(np.isfinite(one))
    np.testing.assert_allclose(mesh, one, atol=1e-4, rtol=0)
    assert child["update_norm"] > 0
    assert child["update_diff"] <= 0.02 * child["update_norm"], child
    np.testing.assert_allclose(child["mesh/logits"], child["one/logits"], atol=1e-5)
    # both started from the checkpoint's bias, and fsdp really split parameters on the mesh
    assert child["one/start_bias"] == child["mesh/start_bias"] == child["ckpt_bias"]
    assert child["mesh/fsdp_split"] > 5 and child["one/fsdp_split"] == 0
