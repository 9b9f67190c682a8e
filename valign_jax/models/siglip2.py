"""SigLIP 2's NaFlex towers with Hugging Face's parameter names (transformers' `siglip2`:
Siglip2Model and its `siglip2_text_model` / `siglip2_vision_model` parts).

The text tower is SigLIP's (models/siglip.py). The vision tower takes images at their own
aspect ratio: an image is a sequence of p×p patches, flattened (row, column, channel), padded
to a fixed number of patches N with a 0/1 `pixel_attention_mask`, and `spatial_shapes`
(h, w) says how its h·w real patches lie. The learned positions are a √M×√M grid (M =
num_patches) resized to each image's (h, w) — bilinear, antialiased when shrinking, exactly as
torch's interpolate(mode="bilinear", antialias=True) that HF uses — and the padded positions
repeat the first one. Padding patches are masked out of every attention, the MAP head's too.

Inputs, to `__call__` / DualEncoder.encode_image:
  - NaFlex: a dict {"pixel_values": (B, N, 3·p²), "spatial_shapes": (B, 2) int,
    "pixel_attention_mask": (B, N)}, as data/naflex.py (or HF's Siglip2ImageProcessor) makes;
  - or NHWC pixels (B, H, W, 3), every image with the same (H/p, W/p) grid and no padding:
    how the ordinary data pipeline feeds it (square images of `image_size`).
Fixed-resolution SigLIP 2 checkpoints (e.g. siglip2-base-patch16-224) are model_type `siglip`
and load as SigLIP (models/siglip.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from valign_jax.models.clip_layer import CLIPLayer
from valign_jax.models.config import TowerConfig
from valign_jax.models.layers import Encoder, deep_adapter, dense, layer_norm, padding_mask
from valign_jax.models.registry import DualCheckpoint, TowerFamily, register, register_dual
from valign_jax.models.siglip import (HEAD_NAMES, NORM_NAMES, PositionTable, SiglipTextConfig,
                                      SiglipTextTower, SiglipVisionConfig, dual_settings,
                                      pool_tokens)

NAFLEX_KEYS = ("pixel_values", "spatial_shapes", "pixel_attention_mask")


@dataclasses.dataclass(frozen=True)
class Siglip2TextConfig(SiglipTextConfig):
    model_type: ClassVar[str] = "siglip2_text_model"
    vocab_size: int = 256000     # the Gemma tokenizer's


@dataclasses.dataclass(frozen=True)
class Siglip2VisionConfig(TowerConfig):
    model_type: ClassVar[str] = "siglip2_vision_model"
    POOLINGS: ClassVar[tuple[str, ...]] = ("map", "mean")
    # image_size is ours: the square side that NHWC inputs (the ordinary pipeline) have.
    RUN_OPTIONS: ClassVar[tuple[str, ...]] = TowerConfig.RUN_OPTIONS + ("image_size",)

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    num_patches: int = 256
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    vision_use_head: bool = True
    image_size: int = 0   # 0: the side whose patch grid is the position grid (√num_patches·p)

    def __post_init__(self):
        super().__post_init__()
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise ValueError(f"Siglip2VisionConfig: num_patches={self.num_patches} must be a "
                             f"square (the position embeddings are a square grid)")
        if not self.image_size:
            object.__setattr__(self, "image_size", side * self.patch_size)

    pooling_mode = SiglipVisionConfig.pooling_mode


# ---------------------------------------------------------------------------------------------
# Positions resized per image


def antialiased_bilinear_weights(in_size: int, out_size, rows: int) -> jax.Array:
    """(rows, in_size) weights resizing a length-`in_size` axis to `out_size` (a traced
    integer is fine) as torch's bilinear interpolation with antialias=True and
    align_corners=False does: a triangle filter widened by the scale when shrinking, its taps
    limited to the window torch uses and normalised to sum 1. Rows >= out_size are unused."""
    scale = in_size / jnp.asarray(out_size, jnp.float32)
    support = jnp.maximum(scale, 1.0)            # the triangle's half-width, in input pixels
    stretch = 1.0 / support
    center = scale * (jnp.arange(rows, dtype=jnp.float32) + 0.5)
    lo = jnp.maximum(jnp.trunc(center - support + 0.5), 0.0)
    hi = jnp.minimum(jnp.trunc(center + support + 0.5), float(in_size))
    taps = jnp.arange(in_size, dtype=jnp.float32)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs((taps[None] - center[:, None] + 0.5) * stretch))
    inside = (taps[None] >= lo[:, None]) & (taps[None] < hi[:, None])
    weights = jnp.where(inside, weights, 0.0)
    total = weights.sum(-1, keepdims=True)
    return weights / jnp.where(total == 0, 1.0, total)


def resized_positions(table: jax.Array, spatial_shape, length: int) -> jax.Array:
    """(length, D) positions of one image whose patches lie on a spatial_shape = (h, w) grid:
    the square (M, D) table resized to (h, w) in row-major order, then the first position
    repeated over the padding."""
    side = math.isqrt(table.shape[0])
    grid = table.astype(jnp.float32).reshape(side, side, -1)
    h, w = spatial_shape[0], spatial_shape[1]
    token = jnp.arange(length)
    real = token < h * w
    row = jnp.where(real, token // jnp.maximum(w, 1), 0)
    col = jnp.where(real, token % jnp.maximum(w, 1), 0)
    along_h = antialiased_bilinear_weights(side, h, length)[row]     # (length, side)
    along_w = antialiased_bilinear_weights(side, w, length)[col]
    out = jnp.einsum("ki,kj,ijd->kd", along_h, along_w, grid,
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(table.dtype)


def nhwc_to_patches(pixel_values, patch_size: int):
    """(B, H, W, C) -> (B, H/p·W/p, p·p·C) patches flattened (row, column, channel), as HF's
    Siglip2ImageProcessor lays them out, and the (H/p, W/p) grid."""
    b, height, width, channels = pixel_values.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"pixel_values of shape {pixel_values.shape} (NHWC): sides must be "
                         f"divisible by patch_size={p}")
    x = pixel_values.reshape(b, height // p, p, width // p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (height // p) * (width // p), p * p * channels)
    return x, (height // p, width // p)


def check_naflex_inputs(length: int, spatial_shapes, pixel_attention_mask) -> None:
    """Every image's (h, w) grid fits the N = `length` patches and the mask marks its h·w real
    patches (checked on concrete values; inside a jitted step they are traced, and the data
    come from naflex_batch or HF's processor)."""
    if isinstance(spatial_shapes, jax.core.Tracer):
        return
    shapes = np.asarray(spatial_shapes)
    if shapes.ndim != 2 or shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (batch, 2) = (h, w) per image, got shape "
                         f"{shapes.shape}")
    counts = shapes.prod(axis=1)
    if shapes.min() < 1 or counts.max() > length:
        raise ValueError(f"spatial_shapes {shapes.tolist()}: every image needs 1 <= h, w and "
                         f"h·w <= {length} (its patches); got h·w = {counts.tolist()}")
    if pixel_attention_mask is not None and not isinstance(pixel_attention_mask,
                                                           jax.core.Tracer):
        real = np.asarray(pixel_attention_mask).sum(axis=1)
        if not np.array_equal(real, counts):
            raise ValueError(f"pixel_attention_mask marks {real.tolist()} real patches per "
                             f"image, but spatial_shapes say h·w = {counts.tolist()}")


class Siglip2VisionTower(nn.Module):
    """HF layout (inside `vision_model/`): embeddings/{patch_embedding (a Linear),
    position_embedding}, encoder/layers/<i>/, post_layernorm/, head/. See the module docstring
    for its inputs."""

    config: Siglip2VisionConfig
    LAYER_PATHS: ClassVar[tuple[tuple[str, ...], ...]] = (("encoder", "layers"),)

    @nn.compact
    def __call__(self, pixel_values, spatial_shapes=None, pixel_attention_mask=None):
        cfg = self.config
        if isinstance(pixel_values, Mapping):
            missing = [k for k in NAFLEX_KEYS if k not in pixel_values]
            if missing:
                raise ValueError(f"NaFlex inputs need {list(NAFLEX_KEYS)}; missing {missing}")
            pixel_values, spatial_shapes, pixel_attention_mask = (pixel_values[k]
                                                                  for k in NAFLEX_KEYS)
        if pixel_values.ndim == 4:
            pixel_values, grid = nhwc_to_patches(pixel_values, cfg.patch_size)
            spatial_shapes = jnp.broadcast_to(jnp.asarray(grid), (pixel_values.shape[0], 2))
        width = cfg.num_channels * cfg.patch_size ** 2
        if pixel_values.ndim != 3 or pixel_values.shape[-1] != width or spatial_shapes is None:
            raise ValueError(f"SigLIP 2 pixel inputs: patches (B, N, {width}) with "
                             f"spatial_shapes (B, 2), or NHWC images; got "
                             f"{pixel_values.shape} and spatial_shapes={spatial_shapes}")
        check_naflex_inputs(pixel_values.shape[1], spatial_shapes, pixel_attention_mask)
        hidden = Siglip2VisionEmbeddings(cfg, name="embeddings")(pixel_values, spatial_shapes)
        mask = None if pixel_attention_mask is None else padding_mask(pixel_attention_mask)
        hidden = Encoder(CLIPLayer, "layers", cfg, name="encoder")(hidden, mask)
        hidden = deep_adapter(CLIPLayer, cfg, hidden, mask)
        hidden = layer_norm(cfg, "post_layernorm")(hidden)
        return {"last_hidden_state": hidden,
                "pooled": pool_tokens(cfg, hidden, pixel_attention_mask)}


class Siglip2VisionEmbeddings(nn.Module):
    config: Siglip2VisionConfig

    @nn.compact
    def __call__(self, patches, spatial_shapes):
        cfg = self.config
        hidden = dense(cfg, cfg.hidden_size, "patch_embedding")(patches.astype(cfg.compute_dtype))
        table = PositionTable(cfg, cfg.num_patches, name="position_embedding")()
        positions = jax.vmap(resized_positions, in_axes=(None, 0, None))(
            table, jnp.asarray(spatial_shapes, jnp.int32), hidden.shape[1])
        return hidden + positions.astype(hidden.dtype)



def _naflex_inputs(config: Siglip2VisionConfig, batch: int) -> dict:
    return {"pixel_values": jnp.zeros((batch, config.image_size, config.image_size,
                                       config.num_channels), jnp.float32)}


_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_B16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072)

TEXT_FAMILY = register(TowerFamily(
    config=Siglip2TextConfig, module=SiglipTextTower, modality="text",
    hf_class="Siglip2TextModel", weight_prefixes=("text_model",), composite=("siglip2", "text"),
    norm_names=NORM_NAMES, deep_norms=("final_layer_norm",), head_names=HEAD_NAMES,
    pads_to_max_positions=True,
    presets={
        "siglip2_b16_text": lambda: Siglip2TextConfig(**_B16),
        "siglip2_tiny_text": lambda: Siglip2TextConfig(**_TINY, vocab_size=512,
                                                       max_position_embeddings=16),
    }))

VISION_FAMILY = register(TowerFamily(
    config=Siglip2VisionConfig, module=Siglip2VisionTower, modality="image",
    hf_class="Siglip2VisionModel", weight_prefixes=("vision_model",),
    composite=("siglip2", "vision"), norm_names=NORM_NAMES, deep_norms=("post_layernorm",),
    head_names=HEAD_NAMES, dummy_inputs=_naflex_inputs,
    presets={
        "siglip2_b16_naflex_vision": lambda: Siglip2VisionConfig(**_B16),
        "siglip2_tiny_naflex_vision": lambda: Siglip2VisionConfig(**_TINY, num_patches=16,
                                                                  patch_size=8),
    }))

DUAL = register_dual(DualCheckpoint("siglip2", "Siglip2Model", heads="identity",
                                    settings=dual_settings, logit_bias=True, logit_shape=(1,)))
