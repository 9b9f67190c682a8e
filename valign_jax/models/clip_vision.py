"""CLIP's vision transformer with HF Flax parameter names (the `vision_model/` of a CLIP
checkpoint): class embedding, bias-free patch conv, `pre_layrnorm` (HF's spelling), quick-GELU
layers, `post_layernorm` on the pooled [CLS] token only.

It takes NHWC float32 pixels, already normalised per the checkpoint's processor config; an image
whose patch grid differs from the checkpoint's gets bicubically interpolated position
embeddings, exactly as HF's `interpolate_pos_encoding=True`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from valign_jax.models.clip_layer import CLIPLayer
from valign_jax.models.config import BASE_SHAPE, LARGE_SHAPE, TowerConfig
from valign_jax.models.layers import (Encoder, add_positions, deep_adapter, layer_norm,
                                      normal_init, patchify)
from valign_jax.models.registry import TowerFamily, register


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(TowerConfig):
    model_type: ClassVar[str] = "clip_vision_model"
    POOLINGS: ClassVar[tuple[str, ...]] = ("cls",)

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    projection_dim: int = 512


class _PositionTable(nn.Module):
    """CLIP keeps its positions in an nn.Embed (`position_embedding/embedding`); this holds the
    same parameter but hands out the whole table, which interpolation needs."""

    config: CLIPVisionConfig
    num_positions: int

    @nn.compact
    def __call__(self):
        return self.param("embedding", normal_init(self.config),
                          (self.num_positions, self.config.hidden_size))


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        patches, grid = patchify(cfg, pixel_values, use_bias=False, name="patch_embedding")
        cls = self.param("class_embedding", normal_init(cfg), (cfg.hidden_size,))
        table = _PositionTable(cfg, (cfg.image_size // cfg.patch_size) ** 2 + 1,
                               name="position_embedding")()
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, cfg.hidden_size))
        return add_positions(jnp.concatenate([cls, patches], axis=1), table, grid)


class CLIPVisionTower(nn.Module):
    """HF layout (inside `vision_model/`): embeddings/, pre_layrnorm/, encoder/layers/<i>/,
    post_layernorm/. As in HF, `last_hidden_state` is the encoder output before post_layernorm,
    and `pooled` is post_layernorm([CLS])."""

    config: CLIPVisionConfig
    LAYER_PATHS: ClassVar[tuple[tuple[str, ...], ...]] = (("encoder", "layers"),)

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        norm = lambda n: layer_norm(cfg, n)
        hidden = CLIPVisionEmbeddings(cfg, name="embeddings")(pixel_values)
        hidden = norm("pre_layrnorm")(hidden)
        hidden = Encoder(CLIPLayer, "layers", cfg, name="encoder")(hidden, None)
        hidden = deep_adapter(CLIPLayer, cfg, hidden, None)
        return {"last_hidden_state": hidden, "pooled": norm("post_layernorm")(hidden[:, 0])}



FAMILY = register(TowerFamily(
    config=CLIPVisionConfig, module=CLIPVisionTower, modality="image",
    hf_class="CLIPVisionModel", weight_prefixes=("vision_model",), composite=("clip", "vision"),
    norm_names=("layer_norm[^/]*", "pre_layrnorm", "post_layernorm"),
    deep_norms=("post_layernorm",),
    position_table="embeddings/position_embedding/embedding",
    presets={
        "clip_b32_vision": lambda: CLIPVisionConfig(**BASE_SHAPE, patch_size=32),
        "clip_b16_vision": lambda: CLIPVisionConfig(**BASE_SHAPE, patch_size=16),
        "clip_l14_vision": lambda: CLIPVisionConfig(**LARGE_SHAPE, patch_size=14),
        "clip_tiny_vision": lambda: CLIPVisionConfig(hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4,
                                                     intermediate_size=128, image_size=32,
                                                     patch_size=8, projection_dim=64),
    }))
