"""Losses on a batch sharded over 8 (fake CPU) devices, and the chunked sigmoid's memory bound.

XLA reads --xla_force_host_platform_device_count only before jax is first imported, so the checks
run in a child Python process started with that flag; the child prints one JSON line of results
and the assertions live here, where a failure shows which check broke and by how much.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
N_DEVICES = 8

CHILD = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from valign_jax import losses

out = {"n_devices": jax.device_count()}
mesh = Mesh(np.array(jax.devices()), ("data",))
sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def features(key, batch, dim, n):
    xs = jax.random.normal(key, (n, batch, dim))
    return list(xs / jnp.linalg.norm(xs, axis=-1, keepdims=True))


def max_diff(a, b):
    # Largest elementwise difference over a pytree, relative to the reference's scale (floor 1).
    def one(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(np.max(np.abs(x - y)) / max(1.0, np.max(np.abs(y))))
    return max(jax.tree.leaves(jax.tree.map(one, a, b)))


img, txt, extra = features(jax.random.key(0), 64, 16, 3)
scale, bias = jnp.float32(10.0), jnp.float32(-10.0)
on_one = lambda x: jax.device_put(x, jax.devices()[0])

# 1. Plain losses under jit with batch-sharded inputs see the global batch.
cases = {
    "softmax": lambda i, t, s, b, e: losses.softmax_contrastive(i, t, s),
    "sigmoid_batch": lambda i, t, s, b, e: losses.sigmoid(i, t, s, b, norm="batch"),
    "sigmoid_pairs_multi": lambda i, t, s, b, e: losses.sigmoid(i, t, s, b, "pairs", e),
}
argnums = (0, 1, 2, 3, 4)
for name, fn in cases.items():
    single = jax.value_and_grad(fn, argnums)(*map(on_one, (img, txt, scale, bias, extra)))
    shardings = (sharded, sharded, replicated, replicated, sharded)
    f = jax.jit(jax.value_and_grad(fn, argnums), in_shardings=shardings)
    args = [jax.device_put(x, s) for x, s in zip((img, txt, scale, bias, extra), shardings)]
    multi = f(*args)
    out[f"sharded_{name}"] = {"value_diff": max_diff(multi[0], single[0]),
                              "grad_diff": max_diff(multi[1], single[1]),
                              "img_shard_shapes": [list(sh.data.shape)
                                                   for sh in args[0].addressable_shards]}

# 2. Chunked sigmoid == unchunked, value and gradients.
for norm in ["batch", "pairs"]:
    for multi_pos in [False, True]:
        e = extra if multi_pos else None
        plain = lambda i, t, s, b: losses.sigmoid(i, t, s, b, norm=norm, txt_extra=e)
        chunked = lambda i, t, s, b: losses.chunked_sigmoid(i, t, s, b, mesh=mesh, norm=norm,
                                                            txt_extra=e)
        want = jax.value_and_grad(plain, (0, 1, 2, 3))(img, txt, scale, bias)
        got = jax.jit(jax.value_and_grad(chunked, (0, 1, 2, 3)))(
            jax.device_put(img, sharded), jax.device_put(txt, sharded), scale, bias)
        out[f"chunked_{norm}_multi{multi_pos}"] = {"value_diff": max_diff(got[0], want[0]),
                                                   "grad_diff": max_diff(got[1], want[1]),
                                                   "value": float(got[0])}
out["chunked_eager_diff"] = max_diff(
    losses.chunked_sigmoid(img, txt, scale, bias, mesh=mesh), losses.sigmoid(img, txt, scale, bias))

# 3. Memory: compile (never run) at B=8192 and look for a BxB buffer in each per-device program.
B, D = 8192, 32
spec = jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=sharded)
scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
bxb = re.compile(rf"\[{B},{B}\]")


def gathered(i, t, s, b):
    # The naive alternative: all-gather both towers' features, then the plain loss on every device.
    i, t = (jax.lax.with_sharding_constraint(x, replicated) for x in (i, t))
    return losses.sigmoid(i, t, s, b)


chunked = lambda i, t, s, b: losses.chunked_sigmoid(i, t, s, b, mesh=mesh)
programs = {
    "chunked_fwd": chunked,
    "chunked_grad": jax.grad(chunked, (0, 1, 2, 3)),
    "gathered_fwd": gathered,
    "gathered_grad": jax.grad(gathered, (0, 1, 2, 3)),
}
for name, fn in programs.items():
    compiled = jax.jit(fn).lower(spec, spec, scalar, scalar).compile()
    mem = compiled.memory_analysis()
    out[f"hlo_{name}"] = {
        "has_BxB": bool(bxb.search(compiled.as_text())),
        "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
        "BxB_bytes": B * B * 4,
        "block_bytes": (B // jax.device_count()) ** 2 * 4,
    }
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def child_result():
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={N_DEVICES}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"  # the forced device count applies to the host (CPU) platform
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_child_sees_eight_devices(child_result):
    print(json.dumps(child_result, indent=1))  # shown with -s or on failure
    assert child_result["n_devices"] == N_DEVICES


@pytest.mark.parametrize("name", ["softmax", "sigmoid_batch", "sigmoid_pairs_multi"])
def test_plain_losses_on_sharded_batch_match_single_device(child_result, name):
    r = child_result[f"sharded_{name}"]
    assert r["img_shard_shapes"] == [[64 // N_DEVICES, 16]] * N_DEVICES  # really split 8 ways
    assert r["value_diff"] <= 1e-5 and r["grad_diff"] <= 1e-5, r


@pytest.mark.parametrize("norm", ["batch", "pairs"])
@pytest.mark.parametrize("multi", [False, True])
def test_chunked_sigmoid_matches_unchunked(child_result, norm, multi):
    r = child_result[f"chunked_{norm}_multi{multi}"]
    assert r["value_diff"] <= 1e-5 and r["grad_diff"] <= 1e-5, r
    assert child_result["chunked_eager_diff"] <= 1e-5


@pytest.mark.parametrize("program", ["fwd", "grad"])
def test_chunked_sigmoid_never_holds_the_full_matrix(child_result, program):
    chunked = child_result[f"hlo_chunked_{program}"]
    gathered = child_result[f"hlo_gathered_{program}"]
    # Positive control: the all-gathered version does materialise B x B on every device ...
    assert gathered["has_BxB"], gathered
    # ... the chunked one has no such buffer in its per-device program.
    assert not chunked["has_BxB"], chunked
    if chunked["temp_bytes"] is not None and gathered["temp_bytes"] is not None:
        assert gathered["temp_bytes"] >= gathered["BxB_bytes"], gathered
        # A few (B/n)² blocks at most. Without rematerialising each block in the backward pass the
        # gradient would keep all n blocks alive (B²/n per device, ~8 blocks here).
        assert chunked["temp_bytes"] < 3 * chunked["block_bytes"], chunked
