"""Compiled cost of one train step per PEFT recipe, next to the full (CLIP) step, in one run:
matrix FLOPs and XLA's planned memory for ViT-B/16 + BERT-base at LiLT's sizes. Frozen weights get
no weight gradients, so LN-only / LwA steps must cost clearly less than the full one.

    python -m benchmarks.peft_step_cost [--batch=8] [--image_size=224] [--out=FILE.json]
"""

from __future__ import annotations

import argparse
import json

from benchmarks import common


def compiled_cost(recipe: str, batch: int, image_size: int, adapters: int = 0) -> dict:
    """Matrix FLOPs (every layer counted: common.matmul_flops; XLA's own count of a scanned
    step sees one layer) and XLA's planned memory of one train step, compiled from shapes."""
    sizes = common.ClipSizes(image_size=image_size, batch=batch)
    model = common.clip_model(sizes, adapters, scan_layers=True)
    compiled, _, extra = common.compiled_train_step(
        model, recipe, common.abstract(common.clip_batch(sizes)))
    memory = common.program_memory(compiled)
    return {"flops": extra["matmul_flops"], "temp_bytes": memory["temp"],
            "peak_bytes": memory["peak"],
            "trainable_percent": 100 * extra["trainable_params"] / extra["total_params"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = {"full": compiled_cost("full", args.batch, args.image_size),
            "lilt_ln": compiled_cost("lilt_ln", args.batch, args.image_size),
            "lilt_lwa": compiled_cost("lilt_lwa", args.batch, args.image_size,
                                      adapters=common.LWA_ADAPTER)}
    full = rows["full"]
    result = {"machine": common.machine(),
              "batch": args.batch, "image_size": args.image_size, "recipes": rows}
    for name in ("lilt_ln", "lilt_lwa"):
        result[f"{name}_vs_full_flops_ratio"] = rows[name]["flops"] / full["flops"]
        result[f"{name}_vs_full_temp_memory_ratio"] = rows[name]["temp_bytes"] / full["temp_bytes"]
        result[f"{name}_vs_full_peak_memory_ratio"] = rows[name]["peak_bytes"] / full["peak_bytes"]
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
