"""The encoder block shared by CLIP's text and vision transformers (HF: CLIPEncoderLayer),
with HF's parameter names: `self_attn/{q,k,v,out}_proj`, `layer_norm1|2`, `mlp/fc1|fc2`."""

from __future__ import annotations

import flax.linen as nn

from valign_jax.models.config import TowerConfig
from valign_jax.models.layers import SelfAttention, activation, dense, layer_norm, maybe_adapter


class CLIPMLP(nn.Module):
    config: TowerConfig

    @nn.compact
    def __call__(self, hidden):
        cfg = self.config
        hidden = activation(cfg.hidden_act)(dense(cfg, cfg.intermediate_size, "fc1")(hidden))
        return dense(cfg, cfg.hidden_size, "fc2")(hidden)


class CLIPLayer(nn.Module):
    """Pre-LN block shared by CLIP's text and vision transformers (HF: CLIPEncoderLayer)."""

    config: TowerConfig

    @nn.compact
    def __call__(self, hidden, mask):
        cfg = self.config
        attn = SelfAttention(cfg.num_attention_heads, names=("q_proj", "k_proj", "v_proj"),
                             out_name="out_proj", dtype=cfg.compute_dtype,
                             attention_impl=cfg.attention_impl, name="self_attn")
        # LiLT's adapters for pre-LN layers: before each LayerNorm, inside the residual branch.
        branch = layer_norm(cfg, "layer_norm1")(maybe_adapter(cfg, hidden, "adapter_1"))
        hidden = hidden + attn(branch, mask)
        branch = layer_norm(cfg, "layer_norm2")(maybe_adapter(cfg, hidden, "adapter_2"))
        return hidden + CLIPMLP(cfg, name="mlp")(branch), None
