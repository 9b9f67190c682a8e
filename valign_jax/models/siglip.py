"""SigLIP's towers with Hugging Face's parameter names (transformers' `siglip`: SiglipModel and
its `siglip_text_model` / `siglip_vision_model` parts).

Both towers use CLIP's pre-LN encoder block (same names: `layer_norm1|2`, `self_attn`, `mlp`),
so LiLT's adapters and deep layers come from the shared layers. What differs from CLIP:
  vision: patch conv with a bias, learned positions and no [CLS] token; `post_layernorm` over
      every token (that is `last_hidden_state`), then the attention-pooling head (MAP, `head/`):
      one learned probe query attends over the tokens, LayerNorm, MLP with a residual. Its
      attention keeps PyTorch MultiheadAttention's packed layout (`in_proj_weight` holds q, k
      and v), so the checkpoint's tensors load by name as they are.
  text: no causal mask, final LayerNorm, pooled = the LAST position's state through the Linear
      `head`. SigLIP was trained on captions padded to max_position_embeddings (64), attending
      to the padding (big_vision and open_clip pass no mask), so the last position is normally
      padding and other padding changes the embedding. The tower therefore ignores
      `attention_mask` unless `mask_padding=True` (what HF's SiglipTextModel does when given
      a mask).
The towers' pooled outputs are already the shared-space embeddings: a SigLIP dual encoder uses
"identity" heads (the DualEncoder adds nothing), and the PEFT recipes' "heads" are these
in-tower heads (the family's `head_names`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from valign_jax.models.clip_layer import CLIPLayer, CLIPMLP
from valign_jax.models.clip_text import CLIPTextEmbeddings
from valign_jax.models.config import TowerConfig
from valign_jax.models.layers import (Encoder, deep_adapter, dense, dot_product_attention,
                                      interpolate_patch_positions, layer_norm, masked_mean,
                                      padding_mask, patchify)
from valign_jax.models.registry import DualCheckpoint, TowerFamily, register, register_dual


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig(TowerConfig):
    model_type: ClassVar[str] = "siglip_text_model"
    POOLINGS: ClassVar[tuple[str, ...]] = ("last", "mean")
    RUN_OPTIONS: ClassVar[tuple[str, ...]] = TowerConfig.RUN_OPTIONS + ("mask_padding",)

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    projection_size: int = 0      # width of `head`'s output; 0: hidden_size, as in HF
    mask_padding: bool = False    # True: attend to real tokens only (see the module docstring)

    def __post_init__(self):
        super().__post_init__()
        if not self.projection_size:
            object.__setattr__(self, "projection_size", self.hidden_size)


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(TowerConfig):
    model_type: ClassVar[str] = "siglip_vision_model"
    POOLINGS: ClassVar[tuple[str, ...]] = ("map", "mean")

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    vision_use_head: bool = True  # False (e.g. PaliGemma's tower): no MAP head, mean pooling

    @property
    def pooling_mode(self) -> str:
        if self.pooling == "map" and not self.vision_use_head:
            raise ValueError(f"{type(self).__name__}: pooling='map' needs the attention-pooling "
                             f"head, and this config has vision_use_head=False")
        return self.pooling or ("map" if self.vision_use_head else "mean")


class PackedMultiheadAttention(nn.Module):
    """Attention of `query` over `keys` with PyTorch MultiheadAttention's parameters:
    `in_proj_weight` (3D, D) and `in_proj_bias` (3D,) hold the q, k, v projections stacked
    (torch's (out, in) orientation, kept so they load unchanged), `out_proj` a Linear."""

    num_heads: int
    dtype: object = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, query, keys, mask=None):
        width = keys.shape[-1]
        weight = self.param("in_proj_weight", nn.initializers.xavier_uniform(), (3 * width, width))
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * width,))
        weight, bias = weight.astype(self.dtype), bias.astype(self.dtype)
        heads = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, width // self.num_heads))
        project = lambda x, i: heads(x.astype(self.dtype) @ weight[i * width:(i + 1) * width].T
                                     + bias[i * width:(i + 1) * width])
        out = dot_product_attention(project(query, 0), project(keys, 1), project(keys, 2), mask,
                                    self.attention_impl)
        out = out.reshape(out.shape[:2] + (width,))
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(out)


class AttentionPoolingHead(nn.Module):
    """SigLIP's MAP head (`head/`): a learned probe attends over the tokens (padding excluded
    when `token_mask`, (B, N) 1/0, is given); LayerNorm; MLP with a residual."""

    config: TowerConfig

    @nn.compact
    def __call__(self, hidden, token_mask=None):
        cfg = self.config
        probe = self.param("probe", nn.initializers.normal(cfg.initializer_range),
                           (1, 1, cfg.hidden_size))
        query = jnp.broadcast_to(probe.astype(hidden.dtype),
                                 (hidden.shape[0], 1, cfg.hidden_size))
        mask = None if token_mask is None else padding_mask(token_mask)
        pooled = PackedMultiheadAttention(cfg.num_attention_heads, cfg.compute_dtype,
                                          cfg.attention_impl, name="attention")(query, hidden,
                                                                                mask)
        pooled = pooled + CLIPMLP(cfg, name="mlp")(layer_norm(cfg, "layernorm")(pooled))
        return pooled[:, 0]


def pool_tokens(config, hidden, token_mask=None):
    """The vision tower's pooled output: the MAP head's, or the mean of the real tokens."""
    if config.pooling_mode == "map":
        return AttentionPoolingHead(config, name="head")(hidden, token_mask)
    return masked_mean(hidden, token_mask)


class SiglipTextTower(nn.Module):
    """HF layout (inside `text_model/`): embeddings/, encoder/layers/<i>/, final_layer_norm/,
    head/. `last_hidden_state` is after the final LayerNorm; `pooled` is head(last token)
    (or head(mean of the real tokens) with pooling="mean"). `attention_mask` masks attention
    only with mask_padding=True."""

    config: SiglipTextConfig
    LAYER_PATHS: ClassVar[tuple[tuple[str, ...], ...]] = (("encoder", "layers"),)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        cfg = self.config
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"input_ids hold {length} tokens, more than this SigLIP text "
                             f"tower's max_position_embeddings={cfg.max_position_embeddings}")
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        hidden = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids, position_ids)
        mask = None
        if cfg.mask_padding and attention_mask is not None:
            mask = padding_mask(attention_mask)
        hidden = Encoder(CLIPLayer, "layers", cfg, name="encoder")(hidden, mask)
        hidden = deep_adapter(CLIPLayer, cfg, hidden, mask)
        hidden = layer_norm(cfg, "final_layer_norm")(hidden)
        token = hidden[:, -1] if cfg.pooling_mode == "last" else masked_mean(hidden,
                                                                             attention_mask)
        return {"last_hidden_state": hidden,
                "pooled": dense(cfg, cfg.projection_size, "head")(token)}


class PositionTable(nn.Module):
    """A learned (num_positions, D) position table kept as nn.Embed keeps it
    (`position_embedding/embedding`), handed out whole for resizing."""

    config: TowerConfig
    num_positions: int

    @nn.compact
    def __call__(self):
        init = nn.initializers.normal(self.config.hidden_size ** -0.5)
        return self.param("embedding", init, (self.num_positions, self.config.hidden_size))


class SiglipVisionTower(nn.Module):
    """HF layout (inside `vision_model/`): embeddings/{patch_embedding, position_embedding},
    encoder/layers/<i>/, post_layernorm/, head/. Takes NHWC pixels; another image size than
    the checkpoint's gets bicubically resized positions (HF's interpolate_pos_encoding)."""

    config: SiglipVisionConfig
    LAYER_PATHS: ClassVar[tuple[tuple[str, ...], ...]] = (("encoder", "layers"),)

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        hidden = SiglipVisionEmbeddings(cfg, name="embeddings")(pixel_values)
        hidden = Encoder(CLIPLayer, "layers", cfg, name="encoder")(hidden, None)
        hidden = deep_adapter(CLIPLayer, cfg, hidden, None)
        hidden = layer_norm(cfg, "post_layernorm")(hidden)
        return {"last_hidden_state": hidden, "pooled": pool_tokens(cfg, hidden)}


class SiglipVisionEmbeddings(nn.Module):
    config: SiglipVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        patches, grid = patchify(cfg, pixel_values, use_bias=True, name="patch_embedding")
        table = PositionTable(cfg, (cfg.image_size // cfg.patch_size) ** 2,
                              name="position_embedding")()
        return patches + interpolate_patch_positions(table, grid)[None].astype(patches.dtype)


_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_B16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072)
_SO400M = dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
               intermediate_size=4304)
# The in-tower heads: what maps each tower's features into the shared space (peft "heads").
HEAD_NAMES = ("head",)
NORM_NAMES = ("layer_norm[12]", "post_layernorm", "final_layer_norm", "layernorm")

TEXT_FAMILY = register(TowerFamily(
    config=SiglipTextConfig, module=SiglipTextTower, modality="text",
    hf_class="SiglipTextModel", weight_prefixes=("text_model",), composite=("siglip", "text"),
    norm_names=NORM_NAMES, deep_norms=("final_layer_norm",), head_names=HEAD_NAMES,
    pads_to_max_positions=True,
    presets={
        "siglip_b16_text": lambda: SiglipTextConfig(**_B16),
        "siglip_so400m_text": lambda: SiglipTextConfig(**_SO400M, vocab_size=32000),
        "siglip_tiny_text": lambda: SiglipTextConfig(**_TINY, vocab_size=512,
                                                     max_position_embeddings=16),
    }))

VISION_FAMILY = register(TowerFamily(
    config=SiglipVisionConfig, module=SiglipVisionTower, modality="image",
    hf_class="SiglipVisionModel", weight_prefixes=("vision_model",),
    composite=("siglip", "vision"), norm_names=NORM_NAMES, deep_norms=("post_layernorm",),
    head_names=HEAD_NAMES, position_table="embeddings/position_embedding/embedding",
    position_prefix_tokens=0,
    presets={
        "siglip_b16_vision": lambda: SiglipVisionConfig(**_B16),
        "siglip_so400m_vision": lambda: SiglipVisionConfig(**_SO400M, image_size=384,
                                                           patch_size=14),
        "siglip_tiny_vision": lambda: SiglipVisionConfig(**_TINY, image_size=32,
                                                         patch_size=8),
    }))


def dual_settings(hf_config, image, text) -> dict:
    """A SigLIP dual encoder's fields: identity heads over the towers' own, embeddings as wide
    as the text head's output, SigLIP's initial scale log 10 and bias -10 (loading replaces
    both with the checkpoint's)."""
    return {"projection_dim": text.projection_size, "logit_scale_init": math.log(10.0),
            "logit_bias_init": -10.0}


DUAL = register_dual(DualCheckpoint("siglip", "SiglipModel", heads="identity",
                                    settings=dual_settings, logit_bias=True, logit_shape=(1,)))
