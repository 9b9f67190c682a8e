"""What XLA makes of a bf16 train step, counted in its HLO: the evidence behind a speed lever
that cannot be timed on this machine (issue: accelerator efficiency).

  cast_once_vs_per_use_converts_ratio   converts in the compiled full step when every tower
                                        kernel and embedding is cast to bf16 once, up front,
                                        over the converts of the step as it is (Flax casts each
                                        weight where it is used)

For each recipe (full, LN-only, LwA) and both variants it records, before optimisation, the
`convert` ops of the lowered program and, after, the converts, fusions and instructions of the
compiled one (all computations, and the entry computation: on a GPU each top-level instruction
is a kernel launch). Counts come from the platform the benchmark runs on: on a CPU they show
what the lever does to the program, not what a GPU's fusion passes would make of it.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from benchmarks import common

RECIPES = (("full", 0), ("lilt_ln", 0), ("lilt_lwa", common.LWA_ADAPTER))
TOWERS = ("vision_model", "text_model")


def cast_once(params, dtype):
    """Tower kernels and embedding tables as `dtype` (the lever being measured); LayerNorm
    parameters, biases, heads and scalars untouched."""
    def one(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        if (names[0] in TOWERS and names[-1] in ("kernel", "embedding")
                and leaf.dtype == jnp.float32):
            return leaf.astype(dtype)
        return leaf
    return jax.tree_util.tree_map_with_path(one, params)


class CastOnce:
    """`model` whose apply casts the parameters once before running (gradients flow back
    through the one cast to the float32 parameters)."""

    def __init__(self, model, dtype):
        self.model, self.dtype = model, dtype

    def apply(self, variables, *args, **kwargs):
        params = cast_once(variables["params"], self.dtype)
        return self.model.apply({**variables, "params": params}, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def hlo_counts(lowered, compiled) -> dict:
    before, after = lowered.as_text(), compiled.as_text()
    entry = after[after.index("ENTRY"):] if "ENTRY" in after else after
    entry = entry[:entry.find("\n}")]
    return {"lowered_converts": _count(r"stablehlo\.convert", before),
            "converts": _count(r"\sconvert\(", after),
            "fusions": _count(r"\sfusion\(", after),
            "instructions": _count(r"\n\s+\S+ = ", after),
            "entry_converts": _count(r"\sconvert\(", entry),
            "entry_fusions": _count(r"\sfusion\(", entry),
            "entry_instructions": _count(r"\n\s+\S+ = ", entry)}


def measure(sizes: common.ClipSizes) -> dict:
    """Figures by name; sizes.dtype should be a 16-bit compute dtype (else there is no cast)."""
    batch = common.abstract(common.clip_batch(sizes))
    dtype = jnp.dtype(sizes.dtype)
    rows = {}
    for recipe, adapters in RECIPES:
        for variant in ("per_use", "cast_once"):
            model = common.clip_model(sizes, adapters)
            stepped = model if variant == "per_use" else CastOnce(model, dtype)
            lowered = common.lowered_train_step(stepped, recipe, batch)[0]
            rows[f"{recipe}/{variant}"] = hlo_counts(lowered, lowered.compile())
    full = rows["full/per_use"], rows["full/cast_once"]
    return {"cast_once_vs_per_use_converts_ratio": common.figure(
        full[1]["converts"] / full[0]["converts"], None, sizes=sizes.describe(),
        platform=jax.default_backend(), counts=rows)}


if __name__ == "__main__":
    import json
    print(json.dumps(measure(common.ClipSizes(image_size=64, text_length=16, batch=4, layers=2,
                                              dtype="bfloat16")), indent=1))
