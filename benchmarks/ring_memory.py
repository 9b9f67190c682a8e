"""`chunked_vs_gathered_{sigmoid,softmax}_peak_memory_ratio`: per-device peak memory of each
contrastive loss and its gradient at a global batch of 32,768 on 8 devices, computed around a
ring (valign_jax.ring_losses: each device holds one (B/n)² block of logits at a time) against
all-gathered (each device gathers the other devices' features and holds B/n × B rows of logits:
big_vision's unchunked SigLIP; open_clip's gathered CLIP loss, one (B/n) × B block per direction).
`chunked_vs_dense_metrics_peak_memory_ratio`: the in-batch retrieval metrics a training log shows
(no gradient), around the ring against `losses.contrastive_metrics` under jit on the same
batch-sharded features (what XLA makes of the plain B×B code).

Peak = arguments + outputs + temporaries − donated bytes of the compiled value-and-gradient
program, as XLA plans it per device. Compiled only (never run) for 8 simulated CPU devices; XLA
reads the device-count flag only before jax is imported, so `measure` runs this module as a
child process:

    python -m benchmarks.ring_memory [--batch=32768] [--dim=1024]   # prints RESULT {json}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEVICES = 8
ROOT = Path(__file__).resolve().parents[1]
GOALS = {"sigmoid": "<= 0.20", "softmax": "<= 0.25"}


def measure(batch: int, dim: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flag = f"--xla_force_host_platform_device_count={DEVICES}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ring_memory",
                           f"--batch={batch}", f"--dim={dim}"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"benchmarks.ring_memory failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    from benchmarks import common
    local = batch // result["devices"]
    blocks = {"logit block (B/n)^2": local * local * 4,
              "gathered rows (B/n x B)": local * batch * 4, "features (B/n x D)": local * dim * 4}
    figures = {}
    for loss, goal in GOALS.items():
        memory = {kind: result["programs"][f"{kind}_{loss}"] for kind in ("chunked", "gathered")}
        peaks = {kind: m["peak"] for kind, m in memory.items()}
        figures[f"chunked_vs_gathered_{loss}_peak_memory_ratio"] = common.figure(
            peaks["chunked"] / peaks["gathered"], goal,
            sizes={"batch": batch, "dim": dim, "devices": result["devices"]},
            peak_bytes=peaks, memory=memory,
            block_bytes=blocks)
    memory = {kind: result["programs"][f"{kind}_metrics"] for kind in ("chunked", "dense")}
    peaks = {kind: m["peak"] for kind, m in memory.items()}
    figures["chunked_vs_dense_metrics_peak_memory_ratio"] = common.figure(
        peaks["chunked"] / peaks["dense"], None,
        sizes={"batch": batch, "dim": dim, "devices": result["devices"]},
        peak_bytes=peaks, memory=memory, block_bytes=blocks)
    return figures


def _programs(batch: int, dim: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from benchmarks import common
    from valign_jax import losses

    mesh = Mesh(np.array(jax.devices()), ("data",))
    local = batch // jax.device_count()

    def own_rows():
        return jax.lax.axis_index("data") * local + jnp.arange(local)

    def gathered_sigmoid(img, txt, scale, bias):
        def per_device(img, txt, scale, bias):
            everyone = jax.lax.all_gather(txt, "data", tiled=True)  # (B, D) on every device
            logits = scale * img @ everyone.T + bias                # (B/n, B)
            z = jnp.where(jnp.arange(batch)[None, :] == own_rows()[:, None], 1.0, -1.0)
            return jax.lax.psum(-jnp.sum(jax.nn.log_sigmoid(z * logits)), "data") / batch
        return jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                             out_specs=P())(img, txt, scale, bias)

    def gathered_softmax(img, txt, scale):
        def per_device(img, txt, scale):
            every_img = jax.lax.all_gather(img, "data", tiled=True)
            every_txt = jax.lax.all_gather(txt, "data", tiled=True)
            # This device's rows of the image->text logits and of the text->image ones.
            i2t = jax.nn.logsumexp(scale * img @ every_txt.T, axis=1)  # (B/n,)
            t2i = jax.nn.logsumexp(scale * txt @ every_img.T, axis=1)
            positives = scale * jnp.sum(img * txt, axis=1)
            total = jnp.sum(i2t) + jnp.sum(t2i) - 2 * jnp.sum(positives)
            return jax.lax.psum(total, "data") / (2 * batch)
        return jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                             out_specs=P())(img, txt, scale)

    features = jax.ShapeDtypeStruct((batch, dim), jnp.float32,
                                    sharding=NamedSharding(mesh, P("data")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    sigmoid_args, softmax_args = (features, features, scalar, scalar), (features, features, scalar)
    programs = {
        "chunked_sigmoid": (lambda i, t, s, b: losses.chunked_sigmoid(i, t, s, b, mesh=mesh),
                            sigmoid_args),
        "gathered_sigmoid": (gathered_sigmoid, sigmoid_args),
        "chunked_softmax": (lambda i, t, s: losses.chunked_softmax_contrastive(i, t, s, mesh=mesh),
                            softmax_args),
        "gathered_softmax": (gathered_softmax, softmax_args),
    }
    out = {}
    for name, (loss, args) in programs.items():
        argnums = tuple(range(len(args)))
        compiled = jax.jit(jax.value_and_grad(loss, argnums)).lower(*args).compile()
        out[name] = common.program_memory(compiled)
    metrics = {"chunked_metrics": lambda i, t, s, b: losses.chunked_contrastive_metrics(
                   i, t, s, b, mesh=mesh),
               "dense_metrics": losses.contrastive_metrics}
    for name, fn in metrics.items():
        out[name] = common.program_memory(jax.jit(fn).lower(*sigmoid_args).compile())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    import jax
    if jax.device_count() != DEVICES:
        raise SystemExit(f"expected {DEVICES} devices, got {jax.device_count()}: run through "
                         f"measure(), which sets XLA_FLAGS before jax is imported")
    print("RESULT " + json.dumps({"devices": jax.device_count(),
                                  "programs": _programs(args.batch, args.dim)}))


if __name__ == "__main__":
    main()
