"""`chunked_vs_gathered_sigmoid_peak_memory_ratio`: per-device peak memory of the sigmoid loss and
its gradient at a global batch of 32,768 on 8 devices, ring-chunked (losses.chunked_sigmoid: each
device holds one (B/n)² block of logits at a time) against all-gathered (each device gathers every
text embedding and holds its B/n × B rows of logits, as big_vision's unchunked SigLIP does).

Compiled only (never run) for 8 simulated CPU devices; XLA reads the device-count flag only
before jax is imported, so `measure` runs this module as a child process:

    python -m benchmarks.sigmoid_memory [--batch=32768] [--dim=1024]   # prints RESULT {json}
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


def measure(batch: int, dim: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flag = f"--xla_force_host_platform_device_count={DEVICES}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sigmoid_memory",
                           f"--batch={batch}", f"--dim={dim}"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"benchmarks.sigmoid_memory failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    from benchmarks import common
    peaks = {name: r["peak"] for name, r in result["programs"].items()}
    return {"chunked_vs_gathered_sigmoid_peak_memory_ratio": common.figure(
        peaks["chunked"] / peaks["gathered"], "<= 0.25",
        sizes={"batch": batch, "dim": dim, "devices": result["devices"]},
        peak_bytes=peaks, memory=result["programs"],
        block_bytes={"chunk (B/n)^2": (batch // DEVICES) ** 2 * 4,
                     "gathered rows (B/n x B)": batch // DEVICES * batch * 4})}


def _programs(batch: int, dim: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from benchmarks import common
    from valign_jax import losses

    mesh = Mesh(np.array(jax.devices()), ("data",))
    local = batch // jax.device_count()

    def gathered(img, txt, scale, bias):
        def per_device(img, txt, scale, bias):
            everyone = jax.lax.all_gather(txt, "data", tiled=True)  # (B, D) on every device
            logits = scale * img @ everyone.T + bias                # (B/n, B)
            own = jax.lax.axis_index("data") * local + jnp.arange(local)
            z = jnp.where(jnp.arange(batch)[None, :] == own[:, None], 1.0, -1.0)
            return jax.lax.psum(-jnp.sum(jax.nn.log_sigmoid(z * logits)), "data") / batch
        return jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                             out_specs=P())(img, txt, scale, bias)

    def chunked(img, txt, scale, bias):
        return losses.chunked_sigmoid(img, txt, scale, bias, mesh=mesh, axis_name="data")

    features = jax.ShapeDtypeStruct((batch, dim), jnp.float32,
                                    sharding=NamedSharding(mesh, P("data")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    out = {}
    for name, loss in (("chunked", chunked), ("gathered", gathered)):
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3))).lower(
            features, features, scalar, scalar).compile()
        out[name] = common.program_memory(compiled)
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
