"""Compiled cost of one train step per PEFT recipe, next to the full (CLIP) step, in one run:
XLA's FLOP count and temp memory for ViT-B/16 + BERT-base at LiLT's sizes. Frozen weights get
no weight gradients, so LN-only / LwA steps must cost clearly less than the full one.

    python -m benchmarks.peft_step_cost [--batch=8] [--image_size=224] [--out=FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import ml_collections

from valign_jax import optim, peft
from valign_jax.models import DualEncoder
from valign_jax.models.presets import preset
from valign_jax.train_step import contrastive_objective, create_state, make_train_step

OPTIM = ml_collections.ConfigDict(dict(name="adamw", lr=1e-4, warmup_init_lr=1e-5, end_lr=1e-5,
                                       warmup_steps=10, b1=0.9, b2=0.999, eps=1e-8,
                                       weight_decay=0.02, grad_clip_norm=0.0))


def compiled_cost(recipe: str, batch: int, image_size: int, adapters: int = 0) -> dict:
    model = DualEncoder(preset("vit_b16", image_size=image_size, adapter_dim=adapters,
                               scan_layers=True),
                        preset("bert_base", adapter_dim=adapters, scan_layers=True),
                        projection_dim=256)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), **model.dummy_inputs())["params"]
    labels = peft.make_labels(params, recipe)
    optimizer = optim.make_optimizer(OPTIM, labels, total_steps=100)
    state = jax.eval_shape(lambda p: create_state(p, optimizer, jax.random.PRNGKey(0)), params)
    step = make_train_step(model, optimizer, labels, contrastive_objective(), "lilt")
    inputs = {"pixel_values": jax.ShapeDtypeStruct((batch, image_size, image_size, 3), "float32"),
              "input_ids": jax.ShapeDtypeStruct((batch, 64), "int32"),
              "attention_mask": jax.ShapeDtypeStruct((batch, 64), "int32")}
    compiled = jax.jit(step, donate_argnums=0).lower(state, inputs).compile()
    memory = compiled.memory_analysis()
    trainable, total = peft.count(params, labels)
    return {"flops": float(compiled.cost_analysis()["flops"]),
            "temp_bytes": int(memory.temp_size_in_bytes),
            "trainable_percent": 100 * trainable / total}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = {"full": compiled_cost("full", args.batch, args.image_size),
            "lilt_ln": compiled_cost("lilt_ln", args.batch, args.image_size),
            "lilt_lwa": compiled_cost("lilt_lwa", args.batch, args.image_size, adapters=192)}
    full = rows["full"]
    result = {"machine": f"{platform.machine()} {jax.devices()[0].device_kind}",
              "batch": args.batch, "image_size": args.image_size, "recipes": rows}
    for name in ("lilt_ln", "lilt_lwa"):
        result[f"{name}_vs_full_flops_ratio"] = rows[name]["flops"] / full["flops"]
        result[f"{name}_vs_full_temp_memory_ratio"] = rows[name]["temp_bytes"] / full["temp_bytes"]
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
