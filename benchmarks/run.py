"""Every speed and memory figure of BENCHMARKS.md, each measured next to its reference in this one
run and written as named figures (value, goal, whether it is met, sizes, raw numbers) to JSON.

    python -m benchmarks.run [--quick | --tiny] [--out=FILE.json] [--only=step_time,sail]

Modes: the issue's sizes by default (on a GPU/TPU: bf16, batch 256); --quick shrinks what does not
fit ten minutes on a 2-core CPU (each figure records its sizes); --tiny is the tests' smoke run.
On an accelerator, model FLOPs utilisation uses the chip's peak from step_time.PEAK_FLOPS, or
--peak_flops. A group that fails is recorded with its error and the run exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback

import jax

from benchmarks import (common, compile_time, micro_batches, ring_memory, sail_throughput,
                        step_hlo, step_time)

CLIP_RECIPES = ("full", "lilt_ln", "lilt_lwa")
# Every figure each group writes (a failed or skipped group still lists them).
GROUPS = {
    "step_time": ("train_step_time_ratio_vs_hf_flax", "ln_only_vs_full_step_time_ratio",
                  "lwa_vs_full_step_time_ratio", "ln_only_vs_full_peak_memory_ratio",
                  "lwa_vs_full_peak_memory_ratio")
    + tuple(f"clip_{r}_{m}" for r in CLIP_RECIPES for m in ("examples_per_s", "mfu")),
    "compile_time": ("scan_vs_unrolled_compile_speedup",),
    "step_hlo": ("cast_once_vs_per_use_converts_ratio",),
    "ring_memory": ("chunked_vs_gathered_sigmoid_peak_memory_ratio",
                    "chunked_vs_gathered_softmax_peak_memory_ratio",
                    "chunked_vs_dense_metrics_peak_memory_ratio"),
    "micro_batches": ("micro_batches_8_vs_1_peak_memory_ratio",
                      "micro_batches_2_vs_1_step_time_ratio"),
    "sail": ("cached_vs_end_to_end_pairs_per_s_ratio",),
    "data_pipeline": ("data_pipeline_vs_tf_data_images_per_s_ratio",
                      "data_pipeline_randaugment_vs_tf_data_images_per_s_ratio",
                      "eval_transform_vs_tf_data_images_per_s_ratio",
                      "data_pipeline_1_worker_images_per_s",
                      "data_pipeline_2_workers_images_per_s"),
}
C, S = common.ClipSizes, sail_throughput.SailSizes
MODES = {
    # name: sizes of each group, and (warm-up, timed) steps
    "tiny": dict(clip=C("vit_tiny", "bert_tiny", 32, 16, 8, projection_dim=64),
                 compile=C("vit_tiny", "bert_tiny", 32, 16, 2, projection_dim=64),
                 hlo=C("vit_tiny", "bert_tiny", 32, 16, 2, projection_dim=64, dtype="bfloat16"),
                 sail=S("dinov2_tiny", "bert_tiny", 32, 16, 8, 64, projection_dim=64),
                 ring=(1024, 64), data=(8, 2, 1), timing=(1, 2),
                 micro=(C("vit_tiny", "bert_tiny", 32, 16, 64, projection_dim=64), 8,
                        C("vit_tiny", "bert_tiny", 32, 16, 16, projection_dim=64), 2)),
    "quick": dict(clip=C(image_size=64, text_length=16, batch=8, layers=6),
                  compile=C(image_size=64, text_length=16, batch=2),
                  hlo=C(image_size=64, text_length=16, batch=4, layers=2, dtype="bfloat16"),
                  sail=S(image_size=112, text_length=40, batch=2, cached_batch=256),
                  ring=(32768, 1024), data=(128, 6, 2), timing=(1, 6),
                  micro=(C(batch=1024), 8, C(text_length=32, batch=8), 2)),
    "full": dict(clip=C(batch=8), compile=C(batch=8), sail=S(batch=8, cached_batch=1024),
                 hlo=C(image_size=64, text_length=16, batch=4, layers=2, dtype="bfloat16"),
                 ring=(32768, 1024), data=(512, 24, 2), timing=(2, 5),
                 micro=(C(batch=1024), 8, C(text_length=32, batch=8), 2)),
    "accelerator": dict(clip=C(batch=256, dtype="bfloat16"),
                        compile=C(batch=256, dtype="bfloat16"),
                        hlo=C(batch=256, dtype="bfloat16"),
                        sail=S(batch=256, dtype="bfloat16"),
                        ring=(32768, 1024), data=(512, 24, 2), timing=(3, 10),
                        micro=(C(batch=1024), 8, C(batch=256, dtype="bfloat16"), 2)),
}


def run_group(group: str, mode: dict, args) -> dict:
    if group == "step_time":
        peak = step_time.peak_flops(jax.devices()[0].device_kind, args.peak_flops)
        return step_time.measure(mode["clip"], mode["timing"], peak,
                                 cudnn=jax.default_backend() == "gpu")
    if group == "compile_time":
        return compile_time.measure(mode["compile"])
    if group == "step_hlo":
        return step_hlo.measure(mode["hlo"])
    if group == "ring_memory":
        return ring_memory.measure(*mode["ring"])
    if group == "micro_batches":
        return micro_batches.measure(*mode["micro"], mode["timing"])
    if group == "sail":
        return sail_throughput.measure(mode["sail"], mode["timing"])
    from benchmarks import data_pipeline
    images, batches, rounds = mode["data"]
    return data_pipeline.measure(images, batches, threads=2, rounds=rounds)


def summary(figures: dict) -> str:
    """A markdown table of the figures, for BENCHMARKS.md."""
    rows = ["| figure | value | goal | met |", "| --- | --- | --- | --- |"]
    for name, f in figures.items():
        value = "skipped: " + f["skipped"] if f.get("skipped") else f"{f['value']:.4g}"
        met = {True: "yes", False: "**no**"}.get(f.get("met"), "")
        rows.append(f"| `{name}` | {value} | {f.get('goal') or ''} | {met} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU sizes that fit ten minutes")
    size.add_argument("--tiny", action="store_true", help="tiny towers: the tests' smoke run")
    parser.add_argument("--out", default="", help="write the figures to this JSON file")
    parser.add_argument("--only", default="", help=f"comma-separated groups of {list(GROUPS)}")
    parser.add_argument("--peak_flops", type=float, default=0.0,
                        help="the chip's peak FLOP/s for MFU (default: by device kind)")
    args = parser.parse_args(argv)
    groups = [g for g in args.only.split(",") if g] or list(GROUPS)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"--only: unknown groups {sorted(unknown)}; known: {list(GROUPS)}")
    # Compile times must be measured, not read back from a cache of an earlier run.
    jax.config.update("jax_enable_compilation_cache", False)
    name = "tiny" if args.tiny else "quick" if args.quick else \
        "accelerator" if jax.default_backend() in ("gpu", "tpu") else "full"
    result = {"mode": name, "machine": common.machine(), "figures": {}, "seconds": {}}
    failed = []
    for group in groups:
        start = time.perf_counter()
        try:
            result["figures"].update(run_group(group, MODES[name], args))
        except Exception as err:  # noqa: BLE001  (recorded; the other groups still run)
            failed.append(group)
            reason = f"failed: {type(err).__name__}: {err}"[:500]
            traceback.print_exc()
            result["figures"].update({f: common.skipped(reason) for f in GROUPS[group]})
        result["seconds"][group] = round(time.perf_counter() - start, 1)
        print(f"[{group}] {result['seconds'][group]} s", flush=True)
        if args.out:  # after every group, so an interrupted run keeps what it measured
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    print(json.dumps(result["machine"]))
    print(summary(result["figures"]))
    bad = [n for n, f in result["figures"].items()
           if f["value"] is not None and not math.isfinite(f["value"])]
    if failed or bad:
        raise SystemExit(f"failed groups: {failed}; non-finite figures: {bad}")


if __name__ == "__main__":
    main()
