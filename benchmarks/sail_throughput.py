"""`cached_vs_end_to_end_pairs_per_s_ratio`: SAIL's training step from cached tower features
(configs/sail.py: only the GLU alignment layers run) against the same step end to end (the
frozen towers run on pixels and both captions every step), in image–caption pairs per second.

Both steps are ours (make_train_step: sigmoid loss over all pairs / B², the long caption as a
second positive, Lion, heads_only) at the same batch; batches sit in device memory, so neither
side pays for input (the cached side would read ~16 KB of features per pair; the end-to-end
side would decode and augment JPEGs). Each side runs at its own batch: the end-to-end step at
what the towers' activations allow, the cached one at SAIL's 32,768 where the machine can (with
no tower activations it fits), as SAIL trains it; per-pair throughput is what is compared.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks import common
from valign_jax.models import DualEncoder, FeaturesConfig
from valign_jax.models.registry import preset
from valign_jax.objectives import sigmoid_objective


@dataclasses.dataclass(frozen=True)
class SailSizes:
    image_preset: str = "dinov2_l14"     # SAIL: DINOv2-L, features [CLS, patch mean]
    text_preset: str = "bert_large"      # GTE-large's architecture, mean pooled
    image_size: int = 224
    text_length: int = 77
    batch: int = 8               # end to end
    cached_batch: int = 32768
    projection_dim: int = 1024
    dtype: str = "float32"

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def _models(sizes: SailSizes):
    image = preset(sizes.image_preset, image_size=sizes.image_size, pooling="cls_mean",
                   dtype=sizes.dtype)
    text = preset(sizes.text_preset, pooling="mean", dtype=sizes.dtype)
    heads = dict(projection_dim=sizes.projection_dim, image_head="glu", text_head="glu",
                 logit_scale_init=float(np.log(20.0)), logit_bias_init=-10.0)
    image_dim = 2 * image.hidden_size  # cls_mean concatenates [CLS] and the patch mean
    cached = DualEncoder(FeaturesConfig(image_dim, "image"),
                         FeaturesConfig(text.hidden_size, "text"), **heads)
    return DualEncoder(image, text, **heads), cached


def _batches(sizes: SailSizes, end_to_end: DualEncoder):
    rng = np.random.default_rng(0)
    b, n = sizes.batch, sizes.text_length
    mask = np.ones((b, n), np.int32)
    ids = lambda: rng.integers(1, 500, (b, n)).astype(np.int32)
    raw = {"pixel_values": rng.uniform(-1, 1, (b, sizes.image_size, sizes.image_size, 3))
           .astype(np.float32), "input_ids": ids(), "attention_mask": mask,
           "long_input_ids": ids(), "long_attention_mask": mask}
    dims = (end_to_end.image_config.hidden_size * 2, end_to_end.text_config.hidden_size)
    b = sizes.cached_batch
    features = {"image_features": rng.normal(size=(b, dims[0])).astype(np.float32),
                "text_features": rng.normal(size=(b, dims[1])).astype(np.float32),
                "long_text_features": rng.normal(size=(b, dims[1])).astype(np.float32)}
    return raw, features


def measure(sizes: SailSizes, timing: tuple[int, int]) -> dict:
    end_to_end, cached = _models(sizes)
    raw, features = _batches(sizes, end_to_end)
    objective = sigmoid_objective("pairs")
    programs, rows = {}, {}
    for name, model, batch in (("cached", cached, features), ("end_to_end", end_to_end, raw)):
        pairs = len(next(iter(batch.values())))
        compiled, state, extra = common.compiled_train_step(
            model, "heads_only", batch, common.LION, objective, "sail",
            params=common.init_params(model))
        programs[name] = (compiled, state, batch)
        rows[name] = {"batch": pairs, "flops": extra["matmul_flops"], **extra}
    for name, seconds in common.step_times(programs, *timing).items():
        rows[name].update(step_s=seconds, pairs_per_s=rows[name]["batch"] / seconds)
    del programs
    return {"cached_vs_end_to_end_pairs_per_s_ratio": common.figure(
        rows["cached"]["pairs_per_s"] / rows["end_to_end"]["pairs_per_s"], ">= 50",
        sizes=sizes.describe(), timing={"warmup": timing[0], "repeats": timing[1]}, steps=rows,
        flops_per_pair_ratio=_per_pair_ratio(rows, "flops"))}


def _per_pair_ratio(rows, key):
    per_pair = {name: (row[key] or 0) / row["batch"] for name, row in rows.items()}
    return per_pair["end_to_end"] / per_pair["cached"] if per_pair["cached"] else None
