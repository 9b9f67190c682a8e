"""Vision transformers with HF Flax parameter names.

ViTTower: HF's ViT layout, in which ViT, DeiT (non-distilled) and DINO checkpoints are published.
  Pre-LN layers, final `layernorm`, optional tanh `pooler`. Pooling by `config.pooling`:
  "cls" (the normed [CLS] token), "mean" (mean of patch tokens), "cls_mean" (concat of both, SAIL's
  DINOv2 features, 2·D wide), "pooler" (HF's tanh(Dense([CLS]))).
CLIPVisionTower: CLIP's vision transformer (`vision_model/` of a CLIP checkpoint): class embedding,
  bias-free patch conv, `pre_layrnorm` (HF's spelling), quick-GELU layers, `post_layernorm` on the
  pooled [CLS] token only.

Both take NHWC float32 pixels, already normalised per the checkpoint's processor config. An image
whose patch grid differs from the checkpoint's gets bicubically interpolated position embeddings,
exactly as HF's `interpolate_pos_encoding=True` (LiLT runs 224-px DeiT weights at 256 px).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from valign_jax.models.clip_text import CLIPLayer
from valign_jax.models.config import TowerConfig
from valign_jax.models.layers import (Encoder, SelfAttention, activation, deep_adapter,
                                      dense, interpolate_patch_positions, layer_norm,
                                      maybe_adapter)


@dataclasses.dataclass(frozen=True)
class ViTConfig(TowerConfig):
    model_type: ClassVar[str] = "vit"
    POOLINGS: ClassVar[tuple[str, ...]] = ("cls", "mean", "cls_mean", "pooler")

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    add_pooling_layer: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.pooling == "pooler" and not self.add_pooling_layer:
            raise ValueError("pooling='pooler' needs add_pooling_layer=True (a checkpoint with "
                             "pooler weights)")


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


def _init(config):
    return nn.initializers.normal(config.initializer_range)


def patchify(config, pixel_values, use_bias: bool, name: str):
    """(B, H, W, C) -> (B, H/p * W/p, D) patch tokens and the (H/p, W/p) grid."""
    _, height, width, channels = pixel_values.shape
    p = config.patch_size
    if channels != config.num_channels or height % p or width % p:
        raise ValueError(f"pixel_values of shape {pixel_values.shape} (NHWC) do not fit this tower: "
                         f"expected {config.num_channels} channels and sides divisible by "
                         f"patch_size={p}")
    conv = nn.Conv(config.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=use_bias,
                   dtype=config.compute_dtype, kernel_init=_init(config), name=name)
    patches = conv(pixel_values.astype(config.compute_dtype))
    return patches.reshape(patches.shape[0], -1, config.hidden_size), (height // p, width // p)


def add_positions(tokens, table, grid):
    """tokens (B, 1 + h*w, D) + the (1 + N, D) position table, patch part resized to `grid`."""
    positions = jnp.concatenate([table[:1], interpolate_patch_positions(table[1:], grid)], axis=0)
    return tokens + positions[None].astype(tokens.dtype)


class ViTPatchEmbeddings(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values):
        return patchify(self.config, pixel_values, use_bias=True, name="projection")


class ViTEmbeddings(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        patches, grid = ViTPatchEmbeddings(cfg, name="patch_embeddings")(pixel_values)
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        cls = self.param("cls_token", _init(cfg), (1, 1, cfg.hidden_size))
        table = self.param("position_embeddings", _init(cfg), (1, num_positions, cfg.hidden_size))
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, cfg.hidden_size))
        return add_positions(jnp.concatenate([cls, patches], axis=1), table[0], grid)


class _Dense(nn.Module):
    """A Dense under HF's `<name>/dense` scope (ViT's intermediate and output sublayers)."""

    config: TowerConfig
    features: int

    @nn.compact
    def __call__(self, x):
        return dense(self.config, self.features, "dense")(x)


class ViTAttention(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, hidden, mask):
        cfg = self.config
        context = SelfAttention(cfg.num_attention_heads, use_bias=cfg.qkv_bias,
                                dtype=cfg.compute_dtype, attention_impl=cfg.attention_impl,
                                name="attention")(hidden, mask)
        return _Dense(cfg, cfg.hidden_size, name="output")(context)


class ViTLayer(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, hidden, mask):
        cfg = self.config
        norm = lambda n: layer_norm(cfg, n)
        # LiLT's adapters for pre-LN layers: before each LayerNorm, inside the residual branch.
        branch = norm("layernorm_before")(maybe_adapter(cfg, hidden, "adapter_before"))
        hidden = hidden + ViTAttention(cfg, name="attention")(branch, mask)
        branch = norm("layernorm_after")(maybe_adapter(cfg, hidden, "adapter_after"))
        inner = activation(cfg.hidden_act)(_Dense(cfg, cfg.intermediate_size,
                                                  name="intermediate")(branch))
        return hidden + _Dense(cfg, cfg.hidden_size, name="output")(inner), None


class ViTTower(nn.Module):
    """HF layout: embeddings/, encoder/layer/<i>/, layernorm/, pooler/ (FlaxViTModel's tree)."""

    config: ViTConfig
    LAYER_PATHS: ClassVar[tuple[tuple[str, ...], ...]] = (("encoder", "layer"),)

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        hidden = ViTEmbeddings(cfg, name="embeddings")(pixel_values)
        hidden = Encoder(ViTLayer, "layer", cfg, name="encoder")(hidden, None)
        hidden = deep_adapter(ViTLayer, cfg, hidden, None)
        hidden = layer_norm(cfg, "layernorm")(hidden)
        pooler_out = None
        if cfg.add_pooling_layer:  # built whenever the checkpoint has one, so weights round-trip
            pooler_out = nn.tanh(_Dense(cfg, cfg.hidden_size, name="pooler")(hidden[:, 0]))
        cls, patch_mean = hidden[:, 0], hidden[:, 1:].mean(axis=1)
        pooled = {"cls": cls, "mean": patch_mean, "pooler": pooler_out,
                  "cls_mean": jnp.concatenate([cls, patch_mean], axis=-1)}[cfg.pooling_mode]
        return {"last_hidden_state": hidden, "pooled": pooled}


class _PositionTable(nn.Module):
    """CLIP keeps its positions in an nn.Embed (`position_embedding/embedding`); this holds the
    same parameter but hands out the whole table, which interpolation needs."""

    config: CLIPVisionConfig
    num_positions: int

    @nn.compact
    def __call__(self):
        return self.param("embedding", _init(self.config),
                          (self.num_positions, self.config.hidden_size))


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        patches, grid = patchify(cfg, pixel_values, use_bias=False, name="patch_embedding")
        cls = self.param("class_embedding", _init(cfg), (cfg.hidden_size,))
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
