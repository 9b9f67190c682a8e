"""Vision transformers with HF Flax parameter names.

ViTTower: HF's ViT layout, in which ViT, DeiT (non-distilled) and DINO checkpoints are published.
  Pre-LN layers, final `layernorm`, optional tanh `pooler`. Pooling by `config.pooling`:
  "cls" (the normed [CLS] token), "mean" (mean of patch tokens), "cls_mean" (concat of both, SAIL's
  DINOv2 features, 2·D wide), "pooler" (HF's tanh(Dense([CLS]))).
  With a DINOv2Config the same tower is HF's Dinov2Model: layers name their norms `norm1`/`norm2`
  and their MLP `mlp/fc1|fc2` (or SwiGLU `mlp/weights_in|weights_out`), scale both residual
  branches by LayerScale (`layer_scale1|2/lambda1`), and the embeddings hold a `mask_token`.
  DINOv2 pools "cls_mean" by default (SAIL's features); "cls" is HF's `pooler_output`.
The tower takes NHWC float32 pixels, already normalised per the checkpoint's processor config. An image
whose patch grid differs from the checkpoint's gets bicubically interpolated position embeddings,
exactly as HF's `interpolate_pos_encoding=True` (LiLT runs 224-px DeiT weights at 256 px).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from valign_jax.models.config import BASE_SHAPE, LARGE_SHAPE, TowerConfig
from valign_jax.models.layers import (ACTIVATIONS, Encoder, SelfAttention, activation,
                                      add_positions, deep_adapter, dense, layer_norm,
                                      maybe_adapter, normal_init, patchify)
from valign_jax.models.registry import TowerFamily, register


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

    @property
    def mlp_width(self) -> int:
        """Width of the MLP's hidden layer."""
        return self.intermediate_size


@dataclasses.dataclass(frozen=True)
class DINOv2Config(ViTConfig):
    """HF's Dinov2Config (model_type "dinov2", e.g. facebook/dinov2-large).

    The MLP width comes from `mlp_ratio` (int(hidden_size * mlp_ratio); SwiGLU: 2/3 of that,
    rounded up to a multiple of 8, as HF); `intermediate_size` is not a DINOv2 key: leave it 0.
    `layerscale_value` only initialises `lambda1`; the stored `lambda1` is the scale, as in HF's
    PyTorch model (HF's Flax model multiplies it by layerscale_value twice more, which only
    agrees when layerscale_value is 1.0, as in every published checkpoint).
    Published checkpoints are 518 px / patch 14 (37x37 positions); any other image size runs
    with bicubically interpolated positions, as HF's PyTorch Dinov2Model always does.
    """

    model_type: ClassVar[str] = "dinov2"
    POOLINGS: ClassVar[tuple[str, ...]] = ("cls_mean", "cls", "mean")

    intermediate_size: int = 0    # derived from mlp_ratio: see mlp_width
    layer_norm_eps: float = 1e-6
    patch_size: int = 14
    add_pooling_layer: bool = False
    mlp_ratio: float = 4
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False
    use_mask_token: bool = True

    def __post_init__(self):
        for key in ("image_size", "patch_size", "hidden_size", "num_channels"):
            if not isinstance(getattr(self, key), int):
                raise ValueError(f"DINOv2Config: {key}={getattr(self, key)!r} is not supported; "
                                 "valign_jax builds square images and patches from one int")
        if self.add_pooling_layer:
            raise ValueError("DINOv2Config: add_pooling_layer=True is not supported: DINOv2 has no "
                             "pooler (HF's pooler_output is the normed [CLS], pooling='cls')")
        super().__post_init__()
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"DINOv2Config: hidden_act={self.hidden_act!r} is not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        if self.intermediate_size and self.intermediate_size != self.mlp_width:
            raise ValueError(f"DINOv2Config: intermediate_size={self.intermediate_size} but DINOv2 "
                             f"sizes its MLP by mlp_ratio={self.mlp_ratio} (width "
                             f"{self.mlp_width}); set mlp_ratio instead")

    @property
    def mlp_width(self) -> int:
        width = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:  # HF's Dinov2SwiGLUFFN
            width = (int(width * 2 / 3) + 7) // 8 * 8
        return width

    def to_hf(self):
        out = super().to_hf()
        del out["intermediate_size"]
        return out


class ViTPatchEmbeddings(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values):
        return patchify(self.config, pixel_values, use_bias=True, name="projection")


class ViTEmbeddings(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values, bool_masked_pos=None):
        cfg = self.config
        patches, grid = ViTPatchEmbeddings(cfg, name="patch_embeddings")(pixel_values)
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        cls = self.param("cls_token", normal_init(cfg), (1, 1, cfg.hidden_size))
        if isinstance(cfg, DINOv2Config) and cfg.use_mask_token:
            mask_token = self.param("mask_token", nn.initializers.zeros, (1, cfg.hidden_size))
            if bool_masked_pos is not None:  # masked patches replaced (DINOv2's iBOT objective)
                patches = jnp.where(bool_masked_pos[..., None],
                                    mask_token[None].astype(patches.dtype), patches)
        if bool_masked_pos is not None and not (isinstance(cfg, DINOv2Config)
                                                and cfg.use_mask_token):
            raise ValueError("bool_masked_pos needs a DINOv2 tower with use_mask_token=True")
        table = self.param("position_embeddings", normal_init(cfg), (1, num_positions, cfg.hidden_size))
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


class LayerScale(nn.Module):
    """DINOv2's per-channel residual-branch scale, HF's `layer_scale<i>/lambda1`."""

    config: DINOv2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = self.param("lambda1", nn.initializers.constant(cfg.layerscale_value),
                           (cfg.hidden_size,))
        return x * scale.astype(x.dtype)


class DINOv2MLP(nn.Module):
    """HF's Dinov2MLP (`fc1`, `fc2`) or, with use_swiglu_ffn, Dinov2SwiGLUFFN (`weights_in`,
    `weights_out`: silu(x1) * x2 of the two halves of weights_in's output)."""

    config: DINOv2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        if cfg.use_swiglu_ffn:
            x1, x2 = jnp.split(dense(cfg, 2 * cfg.mlp_width, "weights_in")(x), 2, axis=-1)
            return dense(cfg, cfg.hidden_size, "weights_out")(nn.silu(x1) * x2)
        inner = activation(cfg.hidden_act)(dense(cfg, cfg.mlp_width, "fc1")(x))
        return dense(cfg, cfg.hidden_size, "fc2")(inner)


class ViTLayer(nn.Module):
    """A pre-LN layer. ViT: layernorm_before, attention, layernorm_after, intermediate/output.
    DINOv2: norm1, attention, layer_scale1, norm2, mlp, layer_scale2."""

    config: ViTConfig

    @nn.compact
    def __call__(self, hidden, mask):
        cfg = self.config
        dino = isinstance(cfg, DINOv2Config)
        norm = lambda vit_name, dino_name: layer_norm(cfg, dino_name if dino else vit_name)
        scale = lambda x, name: LayerScale(cfg, name=name)(x) if dino else x
        # LiLT's adapters for pre-LN layers: before each LayerNorm, inside the residual branch.
        branch = norm("layernorm_before", "norm1")(maybe_adapter(cfg, hidden, "adapter_before"))
        hidden = hidden + scale(ViTAttention(cfg, name="attention")(branch, mask), "layer_scale1")
        branch = norm("layernorm_after", "norm2")(maybe_adapter(cfg, hidden, "adapter_after"))
        if dino:
            return hidden + scale(DINOv2MLP(cfg, name="mlp")(branch), "layer_scale2"), None
        inner = activation(cfg.hidden_act)(_Dense(cfg, cfg.mlp_width,
                                                  name="intermediate")(branch))
        return hidden + _Dense(cfg, cfg.hidden_size, name="output")(inner), None


class ViTTower(nn.Module):
    """HF layout: embeddings/, encoder/layer/<i>/, layernorm/, pooler/ (FlaxViTModel's tree;
    FlaxDinov2Model's with a DINOv2Config). `bool_masked_pos` (B, num_patches), DINOv2 only,
    replaces those patch embeddings by the mask token, as HF's Dinov2Model."""

    config: ViTConfig
    LAYER_PATHS: ClassVar[tuple[tuple[str, ...], ...]] = (("encoder", "layer"),)

    @nn.compact
    def __call__(self, pixel_values, bool_masked_pos=None):
        cfg = self.config
        hidden = ViTEmbeddings(cfg, name="embeddings")(pixel_values, bool_masked_pos)
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



VIT = register(TowerFamily(
    config=ViTConfig, module=ViTTower, modality="image",
    hf_class="ViTModel", weight_prefixes=("", "vit"),
    norm_names=("layernorm[^/]*",), deep_norms=("layernorm",),
    position_table="embeddings/position_embeddings",
    presets={  # HF's ViT layout: ViT, DeiT (non-distilled) and DINO checkpoints
        "vit_b16": lambda: ViTConfig(**BASE_SHAPE, patch_size=16, add_pooling_layer=False),
        "vit_b32": lambda: ViTConfig(**BASE_SHAPE, patch_size=32, add_pooling_layer=False),
        "vit_l16": lambda: ViTConfig(**LARGE_SHAPE, patch_size=16, add_pooling_layer=False),
        "vit_tiny": lambda: ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, image_size=32, patch_size=8,
                                      add_pooling_layer=False),
        # four layers: a per-layer series for the LN-shift analysis (configs/pretrain.py)
        "vit_tiny_l4": lambda: ViTConfig(hidden_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, intermediate_size=128,
                                         image_size=32, patch_size=8, add_pooling_layer=False),
    }))

# DINOv2 (facebook/dinov2-*): 518 px, patch 14, mlp_ratio 4, LayerScale; giant uses SwiGLU
DINOV2 = register(TowerFamily(
    config=DINOv2Config, module=ViTTower, modality="image",
    hf_class="Dinov2Model", weight_prefixes=("", "dinov2"),
    norm_names=("layernorm", "norm[0-9]+"), deep_norms=("layernorm",),
    position_table="embeddings/position_embeddings",
    presets={
        "dinov2_s14": lambda: DINOv2Config(hidden_size=384, num_hidden_layers=12,
                                           num_attention_heads=6, image_size=518),
        "dinov2_b14": lambda: DINOv2Config(hidden_size=768, num_hidden_layers=12,
                                           num_attention_heads=12, image_size=518),
        "dinov2_l14": lambda: DINOv2Config(hidden_size=1024, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=518),
        "dinov2_g14": lambda: DINOv2Config(hidden_size=1536, num_hidden_layers=40,
                                           num_attention_heads=24, image_size=518,
                                           use_swiglu_ffn=True),
        "dinov2_tiny": lambda: DINOv2Config(hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=32, patch_size=8),
    }))
