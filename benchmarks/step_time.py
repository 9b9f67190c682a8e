"""Train-step time of the CLIP dual encoder (ViT + BERT), all in one run:

  train_step_time_ratio_vs_hf_flax   our full step / the HF Flax reference's (hf_reference.py)
  ln_only_vs_full_step_time_ratio    LiLT's LN-only step (`lilt_ln`) / the full step
  lwa_vs_full_step_time_ratio        LiLT's layerwise adapters (`lilt_lwa`) / the full step
  *_peak_memory_ratio                the same pairs, by XLA's planned peak bytes per program
  clip_<recipe>_examples_per_s, clip_<recipe>_mfu
                                     throughput, and model FLOPs utilisation = the step's matrix
                                     FLOPs / step time / the chip's peak

FLOPs are counted on the traced step (common.matmul_flops). XLA's compiled cost analysis would
be the natural source, but on GPU it leaves out the GEMMs handed to cuBLAS; on CPU, where it
counts them, it agrees within a few percent (it adds elementwise work): see xla_flops.
Layers are unrolled, as in the HF reference.
"""

from __future__ import annotations

import jax

from benchmarks import common

# Dense bf16 peak FLOP/s per chip, by a substring of jax's device_kind (first match wins).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
)
RECIPES = (("full", 0), ("lilt_ln", 0), ("lilt_lwa", common.LWA_ADAPTER))
SHORT = {"lilt_ln": "ln_only", "lilt_lwa": "lwa"}


def peak_flops(device_kind: str, override: float = 0.0) -> float:
    """The chip's dense bf16 peak FLOP/s (0.0 when unknown: no MFU is reported)."""
    if override:
        return override
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return 0.0


def measure(sizes: common.ClipSizes, timing: tuple[int, int], peak: float,
            cudnn: bool = False) -> dict:
    """Figures by name. timing = (warm-up rounds, timed rounds); peak: FLOP/s or 0.
    cudnn: also time the full step with jax's fused cuDNN attention (NVIDIA GPUs)."""
    batch = common.clip_batch(sizes)
    programs, rows, skips = {}, {}, {}
    for recipe, adapters in RECIPES:
        model = common.clip_model(sizes, adapters)
        compiled, state, extra = common.compiled_train_step(
            model, recipe, batch, params=common.init_params(model))
        programs[recipe] = (compiled, state, batch)
        rows[recipe] = {"flops": extra["matmul_flops"], "memory": common.program_memory(compiled),
                        "xla_flops": common.program_flops(compiled), **extra}
    hf = _hf_reference(sizes, batch, rows["full"])
    if isinstance(hf, str):
        skips["hf_flax"] = hf
    else:
        programs["hf_flax"], rows["hf_flax"] = hf[:3], hf[3]
    if cudnn:
        try:
            model = common.clip_model(sizes, attention_impl="cudnn")
            compiled, state, extra = common.compiled_train_step(
                model, "full", batch, params=common.init_params(model))
            programs["full_cudnn"], rows["full_cudnn"] = (compiled, state, batch), extra
        except Exception as err:  # noqa: BLE001  (the kernel's shape / version limits)
            skips["full_cudnn"] = f"cuDNN attention did not compile: {str(err)[:300]}"
    for name, seconds in common.step_times(programs, *timing).items():
        rows[name].update(step_s=seconds, examples_per_s=sizes.batch / seconds)
    profiles = {}
    if jax.default_backend() == "gpu":  # where the device time goes, for BENCHMARKS.md
        from benchmarks.profile_step import device_profile
        for recipe in ("full", "lilt_ln"):
            profiles[recipe], _ = device_profile(*programs[recipe])
    del programs
    out = _figures(rows, skips, sizes, timing, peak, jax.devices()[0].device_kind)
    for recipe, profile in profiles.items():
        out[f"clip_{recipe}_examples_per_s"]["profile"] = profile
    return out


def _hf_reference(sizes, batch, full):
    """(step, state, batch, row) of the HF Flax reference, or why it cannot run."""
    try:
        import transformers.models.bert.modeling_flax_bert  # noqa: F401  (Flax models exist)

        from benchmarks.hf_reference import compiled_reference_step
    except ImportError as err:
        return f"transformers' Flax models are not importable ({err})"
    compiled, state, extra = compiled_reference_step(common.clip_model(sizes), batch,
                                                     common.ADAMW)
    if extra["total_params"] != full["total_params"]:
        raise ValueError(f"the HF reference has {extra['total_params']} parameters, ours "
                         f"{full['total_params']}: the sizes differ")
    return compiled, state, batch, extra


def _figures(rows, skips, sizes, timing, peak, kind) -> dict:
    full = rows["full"]
    detail = dict(sizes=sizes.describe(), timing={"warmup": timing[0], "repeats": timing[1]})
    seconds = {name: row["step_s"] for name, row in rows.items()}
    out = {}
    if "hf_flax" in skips:
        out["train_step_time_ratio_vs_hf_flax"] = common.skipped(skips["hf_flax"], "<= 1.0")
    else:
        out["train_step_time_ratio_vs_hf_flax"] = common.figure(
            full["step_s"] / rows["hf_flax"]["step_s"], "<= 1.0", **detail, step_s=seconds,
            compile_s={"ours": full["compile_s"], "hf_flax": rows["hf_flax"]["compile_s"]},
            parameters={"ours": full["total_params"],
                        "hf_flax": rows["hf_flax"]["total_params"]})
    for recipe in ("lilt_ln", "lilt_lwa"):
        row, name = rows[recipe], SHORT[recipe]
        out[f"{name}_vs_full_step_time_ratio"] = common.figure(
            row["step_s"] / full["step_s"], "<= 0.7" if recipe == "lilt_ln" else None,
            **detail, step_s=seconds,
            flops_ratio=row["flops"] / full["flops"] if row["flops"] and full["flops"] else None,
            trainable_percent=100 * row["trainable_params"] / row["total_params"])
        peak_bytes = {r: rows[r]["memory"].get("peak") for r in ("full", recipe)}
        out[f"{name}_vs_full_peak_memory_ratio"] = common.figure(
            peak_bytes[recipe] / peak_bytes["full"] if all(peak_bytes.values()) else None,
            **detail, peak_bytes=peak_bytes,
            memory={"full": full["memory"], recipe: row["memory"]})
    for recipe, _ in RECIPES:
        row = rows[recipe]
        out[f"clip_{recipe}_examples_per_s"] = common.figure(
            row["examples_per_s"], **detail, step_s=row["step_s"], flops=row["flops"])
        if peak and row["flops"]:
            out[f"clip_{recipe}_mfu"] = common.figure(
                row["flops"] / row["step_s"] / peak, ">= 0.5" if recipe == "full" else None,
                **detail, flops=row["flops"], step_s=row["step_s"], peak_flops=peak)
        else:
            out[f"clip_{recipe}_mfu"] = common.skipped(
                f"no peak FLOP/s known for device kind {kind!r}; pass --peak_flops" if not peak
                else "no FLOP count for the step")
    if "full_cudnn" in skips:
        out["cudnn_vs_xla_attention_step_time_ratio"] = common.skipped(skips["full_cudnn"])
    elif "full_cudnn" in rows:
        out["cudnn_vs_xla_attention_step_time_ratio"] = common.figure(
            rows["full_cudnn"]["step_s"] / full["step_s"], "<= 1.0", **detail, step_s=seconds)
    return out
