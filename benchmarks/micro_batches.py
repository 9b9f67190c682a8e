"""What gradient caching (`config.micro_batches`, docs/methods.md §8) costs and saves, against
the same train step taking its whole batch at once, in one run:

  micro_batches_8_vs_1_peak_memory_ratio   per-device peak memory of the full CLIP step (ViT-B/16
                                           + BERT-base, 224 px, global batch 1024) in 8 micro-
                                           batches / at once; compiled, never run (XLA's memory
                                           analysis of each program), so a CPU can plan a step
                                           no CPU could hold
  micro_batches_2_vs_1_step_time_ratio     measured step time in 2 micro-batches / at once, at a
                                           size that fits both (the sizes are in the JSON)

Peak = arguments + outputs + temporaries − donated bytes, as common.program_memory reads it.
Both programs are `make_train_step` with the same model, optimizer (AdamW) and loss; layers are
scanned (config.model.scan_layers), which keeps each base-size compile to seconds on a CPU and
changes neither side's activations. Gradient caching runs the towers forward twice, so its
matrix FLOPs are about 4/3 of the whole-batch step's (both counts are in the JSON): that is the
floor of the time ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import common

GOALS = {"memory": "<= 0.25", "time": "<= 1.4"}


def abstract_batch(sizes: common.ClipSizes) -> dict:
    """The batch's shapes only: at 1024 × 224² pixels the values would take 600 MB to make."""
    b, n, px = sizes.batch, sizes.text_length, sizes.image_size
    return {"pixel_values": jax.ShapeDtypeStruct((b, px, px, 3), jnp.float32),
            "input_ids": jax.ShapeDtypeStruct((b, n), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((b, n), jnp.int32)}


def measure(memory_sizes: common.ClipSizes, memory_k: int, time_sizes: common.ClipSizes,
            time_k: int, timing: tuple[int, int]) -> dict:
    """The two figures; timing = (warm-up rounds, timed rounds)."""
    model = common.clip_model(memory_sizes, scan_layers=True)
    batch = abstract_batch(memory_sizes)
    memory, compile_s = {}, {}
    for k in (1, memory_k):
        compiled, _, extra = common.compiled_train_step(model, "full", batch, micro_batches=k)
        memory[k], compile_s[k] = common.program_memory(compiled), extra["compile_s"]
        del compiled
    peaks = {f"micro_batches={k}": m.get("peak") for k, m in memory.items()}
    out = {f"micro_batches_{memory_k}_vs_1_peak_memory_ratio": common.figure(
        memory[memory_k]["peak"] / memory[1]["peak"] if memory[1].get("peak") else None,
        GOALS["memory"], sizes=memory_sizes.describe(), micro_batches=memory_k,
        peak_bytes=peaks, memory={f"micro_batches={k}": m for k, m in memory.items()},
        compile_s=compile_s, compiled_not_run=True)}

    model = common.clip_model(time_sizes, scan_layers=True)
    batch, params = common.clip_batch(time_sizes), common.init_params(model)
    programs, flops = {}, {}
    for k in (1, time_k):
        compiled, state, extra = common.compiled_train_step(
            model, "full", batch, params=jax.tree.map(jnp.array, params), micro_batches=k)
        programs[f"micro_batches={k}"] = (compiled, state, batch)
        flops[f"micro_batches={k}"] = extra["matmul_flops"]
    seconds = common.step_times(programs, *timing)
    del programs
    out[f"micro_batches_{time_k}_vs_1_step_time_ratio"] = common.figure(
        seconds[f"micro_batches={time_k}"] / seconds["micro_batches=1"], GOALS["time"],
        sizes=time_sizes.describe(), micro_batches=time_k, step_s=seconds,
        matmul_flops=flops, timing={"warmup": timing[0], "repeats": timing[1]})
    return out
