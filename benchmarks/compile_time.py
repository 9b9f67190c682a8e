"""`scan_vs_unrolled_compile_speedup`: seconds to trace, lower and compile the whole dual-encoder
train step (two 12-layer towers, forward, backward, AdamW) with the layers unrolled, divided by
the same with `nn.scan` over layers (config.model.scan_layers), which traces one layer per tower.
Compiled from shapes only: nothing is allocated or run.
"""

from __future__ import annotations

import time

from benchmarks import common


def _compile_seconds(sizes: common.ClipSizes, scan: bool) -> dict:
    model = common.clip_model(sizes, scan_layers=scan)
    batch = common.abstract(common.clip_batch(sizes))
    start = time.perf_counter()
    _, _, extra = common.compiled_train_step(model, "full", batch)
    # compile_s: trace + lower + compile of the step; total_s adds tracing the parameter init
    return {"total_s": time.perf_counter() - start, "compile_s": extra["compile_s"]}


def measure(sizes: common.ClipSizes) -> dict:
    import jax
    # A throwaway compile first, so one-time start-up costs (backend, LLVM) fall on neither side.
    jax.jit(lambda x: 2 * x).lower(1.0).compile()
    scanned = _compile_seconds(sizes, scan=True)
    unrolled = _compile_seconds(sizes, scan=False)
    return {"scan_vs_unrolled_compile_speedup": common.figure(
        unrolled["compile_s"] / scanned["compile_s"], ">= 2.5", sizes=sizes.describe(),
        seconds={"unrolled": unrolled, "scan": scanned})}
