"""Where a compiled train step spends its GPU time: a jax.profiler trace of a few steps, read back
with jax.profiler.ProfileData and summed per kernel and per kind of kernel (matrix products,
cuDNN attention, copies, XLA's other fusions: elementwise, reductions, softmax, LayerNorm).

This is the "what the profile shows" behind a missed goal in BENCHMARKS.md; benchmarks.run
attaches it to the full and LN-only step figures on a GPU.
"""

from __future__ import annotations

import collections
import glob
import tempfile
import time

import jax

KINDS = (  # kernel-name fragments (lower case) -> kind; first match wins
    ("fused attention", ("fmha", "flash", "sdpa")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "dot")),
    ("other cuDNN (the patch convolution)", ("cudnn", "conv")),
    ("copy / memset", ("memcpy", "memset", "copy")),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    for kind, fragments in KINDS:
        if any(f in name for f in fragments):
            return kind
    return "other fusions (elementwise, reductions, softmax, norms)"


def device_profile(step, state, batch, steps: int = 3, top: int = 12) -> tuple[dict, object]:
    """(summary, state after the steps): per-step milliseconds of device time by kind and the
    `top` kernels, and device-busy time over wall time (the rest is launch or host overhead)."""
    from jax.profiler import ProfileData
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        files = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(files[0])
    kernels, lines = collections.Counter(), {}
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            events = list(line.events)
            lines[line.name] = round(sum(e.duration_ns for e in events) / 1e6 / steps, 3)
            if "stream" in line.name.lower():  # kernels run on streams; other lines nest ops
                for event in events:
                    kernels[event.name] += event.duration_ns
    per_step = {name: ns / 1e6 / steps for name, ns in kernels.items()}
    busy = sum(per_step.values())
    by_kind = collections.Counter()
    for name, ms in per_step.items():
        by_kind[kind_of(name)] += ms
    return {"wall_ms_per_step": 1e3 * wall / steps, "device_busy_ms_per_step": busy,
            "ms_per_step_by_kind": {k: round(v, 3) for k, v in by_kind.most_common()},
            "top_kernels_ms_per_step": {n[:120]: round(ms, 3) for n, ms in
                                        collections.Counter(per_step).most_common(top)},
            "trace_lines_ms_per_step": lines}, state
