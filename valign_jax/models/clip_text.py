"""CLIP text transformer with HF Flax parameter names (the `text_model` of a CLIP checkpoint).

Pre-LayerNorm layers under a causal mask (and the padding mask), a final LayerNorm, and pooling at
the end-of-text token. HF has two conventions for finding it, and both are kept:
  eos_token_id == 2 (configs written before transformers PR #24773): argmax of the token ids,
  which works because OpenAI's EOT id is the largest in the vocabulary;
  otherwise: the first position holding eos_token_id.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from valign_jax.models.clip_layer import CLIPLayer
from valign_jax.models.config import TowerConfig
from valign_jax.models.layers import (Encoder, causal_mask, deep_adapter, layer_norm, masked_mean,
                                      padding_mask)
from valign_jax.models.registry import DualCheckpoint, TowerFamily, register, register_dual


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(TowerConfig):
    model_type: ClassVar[str] = "clip_text_model"
    POOLINGS: ClassVar[tuple[str, ...]] = ("eos", "mean")

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    projection_dim: int = 512


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, position_ids):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                          name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                             name="position_embedding")(position_ids)
        return (tokens + positions).astype(cfg.compute_dtype)


def eos_positions(input_ids, eos_token_id: int):
    """Index of the end-of-text token per row, by HF's rule for this eos_token_id."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTower(nn.Module):
    """HF layout (inside `text_model/`): embeddings/, encoder/layers/<i>/, final_layer_norm/.

    `last_hidden_state` is after the final LayerNorm, as in HF. Pooling "eos" is HF's
    pooler_output; "mean" averages real tokens.
    """

    config: CLIPTextConfig
    LAYER_PATHS: ClassVar[tuple[tuple[str, ...], ...]] = (("encoder", "layers"),)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        cfg = self.config
        length = input_ids.shape[-1]
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        hidden = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids, position_ids)
        mask = causal_mask(length)
        if attention_mask is not None:
            mask = mask & padding_mask(attention_mask)
        hidden = Encoder(CLIPLayer, "layers", cfg, name="encoder")(hidden, mask)
        hidden = deep_adapter(CLIPLayer, cfg, hidden, mask)
        hidden = layer_norm(cfg, "final_layer_norm")(hidden)
        if cfg.pooling_mode == "eos":
            pooled = jnp.take_along_axis(
                hidden, eos_positions(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
        else:
            pooled = masked_mean(hidden, attention_mask)
        return {"last_hidden_state": hidden, "pooled": pooled}


_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)

FAMILY = register(TowerFamily(
    config=CLIPTextConfig, module=CLIPTextTower, modality="text",
    hf_class="CLIPTextModel", weight_prefixes=("text_model",), composite=("clip", "text"),
    norm_names=("layer_norm[^/]*", "final_layer_norm"),
    presets={
        "clip_b32_text": lambda: CLIPTextConfig(),
        "clip_l14_text": lambda: CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                num_attention_heads=12, projection_dim=768),
        "clip_tiny_text": lambda: CLIPTextConfig(**_TINY, vocab_size=512,
                                                 max_position_embeddings=32, eos_token_id=3,
                                                 projection_dim=64),
    }))

# A full CLIPModel: these towers (and CLIP's vision tower) with bias-free linear projections.
DUAL = register_dual(DualCheckpoint(
    "clip", "CLIPModel", heads="linear",
    settings=lambda hf_config, image, text: {
        "projection_dim": hf_config.get("projection_dim", 512),
        "logit_scale_init": hf_config.get("logit_scale_init_value", 2.6592)},
    config_fields=lambda model: {"projection_dim": model.projection_dim,
                                 "logit_scale_init_value": model.logit_scale_init}))
