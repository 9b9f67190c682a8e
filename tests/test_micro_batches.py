"""Gradient caching (`config.micro_batches`, docs/methods.md §8): a step over k micro-batches is
the whole batch's step, and the ring softmax is CLIP's loss inside a real train step.

Every comparison runs the trainer a run builds (train.make_trainer) on a demo config's tiny
towers and its own synthetic batch, once with micro_batches = 1 (the reference: the whole batch
through autodiff at once) and once with k; tests/micro_batch_helpers.py says how the distances
are measured. On one device in this process; on 8 simulated devices (data 4 × fsdp 2, the
fsdp threshold lowered so the towers' kernels really are split) in a child process, since XLA
reads the device-count flag only before jax is imported. The last test kills a micro-batched
run and resumes it.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import pytest

import valign_jax
from valign_jax import sharding, train

from conftest import REPO
from micro_batch_helpers import (OBJECTIVES, RECIPES, Steps, assert_same_step, distances,
                                 logit_preset)
from reliability_helpers import assert_trees_equal, run_config, run_main

ONE_DEVICE = [(o, r, k) for o in OBJECTIVES for r in RECIPES for k in (2, 4)]


@pytest.fixture(scope="module")
def one_device():
    """Steps on one device: a model, its parameters and a batch per recipe and logit preset,
    and each (objective, recipe)'s whole-batch step, made once for both k."""
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    models, whole = {}, {}

    def steps(objective, recipe):
        key = recipe, logit_preset(objective)
        if key not in models:
            models[key] = Steps(objective, recipe, 8, mesh)
        return models[key]

    def reference(objective, recipe):
        if (objective, recipe) not in whole:
            whole[objective, recipe] = steps(objective, recipe).step(objective)
        return whole[objective, recipe]
    return steps, reference


@pytest.mark.parametrize("objective, recipe, k", ONE_DEVICE)
def test_micro_batched_step_is_the_whole_batch_step_on_one_device(one_device, objective,
                                                                   recipe, k):
    """Batch 8 in k = 2 or 4 micro-batches; objectives: softmax, sigmoid with norm batch and
    pairs, multi-positive (each image's second caption), CLIP-Refine (a teacher, RaFA's draw);
    recipes: full, and LiLT's layerwise adapters (frozen towers but for adapters and
    LayerNorms). Asserts: loss, gradients (AdamW's first moment) and updated parameters equal
    the whole-batch step's within 1e-5, relative; so do the logged metrics."""
    steps, reference = one_device
    cached = steps(objective, recipe).step(objective, k)
    assert_same_step(distances(reference(objective, recipe), cached))


# ---------------------------------------------------------------------------------------------
# 8 simulated devices

# Each objective once, recipes and k alternating (every pairing is tested on one device above;
# here what the mesh adds: rows split per device, parameters and the teacher split over fsdp).
MESH_CASES = [("softmax", "full", 4), ("sigmoid_batch", "lilt_lwa", 2),
              ("sigmoid_pairs", "full", 2), ("multi_positive", "lilt_lwa", 4),
              ("clip_refine", "lilt_lwa", 2)]
# config.objective.chunked (the ring forms), alone and with micro-batches, against the plain
# loss's whole-batch step: name -> (objective, micro_batches).
RING_CASES = {"ring_softmax": ("softmax", 1), "ring_softmax_micro2": ("softmax", 2),
              "ring_sigmoid_pairs_micro4": ("sigmoid_pairs", 4)}

CHILD = r"""
import json, re, sys
sys.path.insert(0, "tests")
import jax
import numpy as np
from valign_jax import sharding
from valign_jax.config_checks import find_problems
from valign_jax.train_step import split_micro_batches
from micro_batch_helpers import Steps, case_config, distances, logit_preset

cases, ring_cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
mesh = sharding.make_mesh(4, 2)
out = {"devices": jax.device_count(), "cases": {}, "fsdp_split": {}}
models, whole = {}, {}
for objective, recipe, k in cases + [(o, "full", k) for o, k in ring_cases.values()]:
    key = recipe, logit_preset(objective)
    if key not in models:  # batch 32: 4 rows per device, so k = 4 leaves one each
        models[key] = Steps(objective, recipe, 32, mesh, **{"mesh.min_fsdp_size": 256})
    if (objective, recipe) not in whole:
        whole[objective, recipe] = models[key].step(objective)
for objective, recipe, k in cases:
    step = models[recipe, logit_preset(objective)].step(objective, k)
    out["cases"][f"{objective}/{recipe}/{k}"] = distances(whole[objective, recipe], step)
    out["fsdp_split"][recipe] = step["fsdp_split"]
for name, (objective, k) in ring_cases.items():
    step = models["full", logit_preset(objective)].step(objective, k,
                                                        **{"objective.chunked": True})
    out["cases"][name] = distances(whole[objective, "full"], step)

# Splitting a batch sharded by rows: every device keeps its own rows, no data moves.
rows = jax.device_put(np.arange(32), sharding.batch_sharding(mesh))
owner = {s.device: set(np.asarray(s.data).tolist()) for s in rows.addressable_shards}
split = jax.jit(lambda x: split_micro_batches(x, 4))
chunks = split(rows)
out["split_keeps_rows"] = all(set(np.asarray(s.data).ravel().tolist()) <= owner[s.device]
                              for s in chunks.addressable_shards)
hlo = split.lower(rows).compile().as_text()
out["split_collectives"] = re.findall(r"(all-to-all|all-gather|collective-permute|all-reduce)\(",
                                      hlo)
out["micro_batches"] = [np.asarray(chunks[j]).tolist() for j in range(4)]
# A batch whose per-device rows do not split into k micro-batches: 16 rows, 2 per device.
out["problems"] = find_problems(case_config("softmax", "full", 16, 4))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_devices():
    """The mesh cases' distances, from a child process with 8 simulated CPU devices. LLVM's
    optimisation is lowered there, as for the benchmarks' smoke run: the steps compile faster
    and compute the same. The child compiles afresh: on this jax, 8-device CPU programs read
    back from the persistent compilation cache have hung in their collectives' rendezvous."""
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(MESH_CASES),
                           json.dumps(RING_CASES)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("objective, recipe, k", MESH_CASES)
def test_micro_batched_step_is_the_whole_batch_step_on_eight_devices(eight_devices, objective,
                                                                     recipe, k):
    """The same on data 4 × fsdp 2: batch 32, the towers' kernels (and CLIP-Refine's teacher)
    split over fsdp."""
    assert eight_devices["devices"] == 8
    assert eight_devices["fsdp_split"][recipe] > 10  # parameter arrays split over fsdp
    assert_same_step(eight_devices["cases"][f"{objective}/{recipe}/{k}"])


@pytest.mark.parametrize("name", RING_CASES)
def test_ring_losses_inside_the_train_step_equal_the_plain_ones(eight_devices, name):
    """config.objective.chunked=True on 8 devices (the loss and its metrics computed around the
    ring of devices), alone and with micro-batches: the step equals the plain softmax / sigmoid
    whole-batch step within 1e-5, metrics included."""
    assert_same_step(eight_devices["cases"][name])


def test_micro_batches_take_each_devices_own_rows(eight_devices):
    """Micro-batch j of a batch sharded over 8 devices holds rows j, j + 4, ...: each device's
    part of it is rows it already holds, and the compiled split has no collective."""
    assert eight_devices["micro_batches"][1] == list(range(1, 32, 4))
    assert eight_devices["split_keeps_rows"]
    assert eight_devices["split_collectives"] == []


def test_a_batch_whose_device_rows_do_not_split_is_refused(eight_devices):
    """Batch 16 on 8 devices with micro_batches=4: 2 rows per device. The config checks name the
    keys and the batch size that would work."""
    [problem] = eight_devices["problems"]
    assert ("config.batch_size=16 gives each of the 8 data-parallel devices (mesh "
            "data=8 × fsdp=1) 2 rows, which do not split into config.micro_batches=4 "
            "micro-batches; choose a batch size that is a multiple of 32") in problem


# ---------------------------------------------------------------------------------------------
# Resuming


def test_a_micro_batched_run_killed_and_rerun_ends_bit_identical(tmp_path):
    """The clip demo cut to 6 steps of 8 in 2 micro-batches, a checkpoint every 2 steps.
    `python -m valign_jax.main` SIGKILLed right after step 3 (tests/kill_run.py), then rerun:
    it resumes from checkpoint 2 and its parameters at steps 4 and 6 equal an uninterrupted
    run's bit for bit."""
    changes = {"micro_batches": 2, "total_steps": 6, "checkpoint_every": 2, "log_every": 2,
               "eval_every": 6}
    straight = tmp_path / "straight"
    train.train_and_evaluate(run_config(**changes), straight)
    preempted = tmp_path / "preempted"
    killed = run_main(preempted, sigkill_at="step:3", **changes)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    rerun = run_main(preempted, **changes)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [line.rsplit(" ", 1)[-1] for line in rerun.stderr.splitlines()
            if "resumed from" in line] == ["2"]
    saved = json.loads((preempted / "config.json").read_text())
    assert saved["micro_batches"] == 2
    for step in (4, 6):
        assert_trees_equal(valign_jax.load_trained(preempted, step)[1],
                           valign_jax.load_trained(straight, step)[1])
