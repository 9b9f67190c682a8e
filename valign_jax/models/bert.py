"""BERT-family text tower (BERT, SimCSE, MiniLM, ...) with HF Flax parameter names.

Post-LayerNorm layers: x = LN(x + Attention(x)); x = LN(x + MLP(x)).
Outputs `last_hidden_state` (B, L, D) and `pooled` (B, D) by `config.pooling`:
  "cls"    the [CLS] hidden state (LiLT, unsupervised SimCSE),
  "mean"   the mean over real (unmasked) tokens,
  "pooler" HF's pooler: tanh(Dense([CLS])) (supervised SimCSE's "cls" pooling).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from valign_jax.models.config import BASE_SHAPE, LARGE_SHAPE, TowerConfig
from valign_jax.models.layers import (Encoder, SelfAttention, activation, deep_adapter, dense,
                                      layer_norm, masked_mean, maybe_adapter, padding_mask)
from valign_jax.models.registry import TowerFamily, register


@dataclasses.dataclass(frozen=True)
class BertConfig(TowerConfig):
    model_type: ClassVar[str] = "bert"
    POOLINGS: ClassVar[tuple[str, ...]] = ("cls", "mean", "pooler")

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    add_pooling_layer: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type={self.position_embedding_type!r} is not "
                             "supported; only 'absolute' BERT checkpoints load")
        if self.pooling == "pooler" and not self.add_pooling_layer:
            raise ValueError("pooling='pooler' needs add_pooling_layer=True (a checkpoint with "
                             "pooler weights)")


class DenseResidualNorm(nn.Module):
    """BERT's sublayer output: LayerNorm(Dense(h) + residual), HF names `dense` and `LayerNorm`."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden, residual):
        cfg = self.config
        hidden = dense(cfg, cfg.hidden_size, "dense")(hidden)
        # LiLT's adapter for post-LN layers: after the output dense, before residual add + LN.
        hidden = maybe_adapter(cfg, hidden, "adapter")
        return layer_norm(cfg, "LayerNorm")(hidden + residual)


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, mask):
        cfg = self.config
        context = SelfAttention(cfg.num_attention_heads, dtype=cfg.compute_dtype,
                                attention_impl=cfg.attention_impl, name="self")(hidden, mask)
        return DenseResidualNorm(cfg, name="output")(context, hidden)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden):
        cfg = self.config
        return activation(cfg.hidden_act)(dense(cfg, cfg.intermediate_size, "dense")(hidden))


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, mask):
        hidden = BertAttention(self.config, name="attention")(hidden, mask)
        inner = BertIntermediate(self.config, name="intermediate")(hidden)
        return DenseResidualNorm(self.config, name="output")(inner, hidden), None


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        embed = lambda n, size: nn.Embed(size, cfg.hidden_size, embedding_init=init, name=n)
        hidden = (embed("word_embeddings", cfg.vocab_size)(input_ids)
                  + embed("position_embeddings", cfg.max_position_embeddings)(position_ids)
                  + embed("token_type_embeddings", cfg.type_vocab_size)(token_type_ids))
        return layer_norm(cfg, "LayerNorm")(hidden).astype(cfg.compute_dtype)


class BertTower(nn.Module):
    """HF layout: embeddings/, encoder/layer/<i>/, pooler/ (FlaxBertModel's parameter tree)."""

    config: BertConfig
    LAYER_PATHS: ClassVar[tuple[tuple[str, ...], ...]] = (("encoder", "layer"),)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        hidden = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, position_ids)
        mask = padding_mask(attention_mask)
        hidden = Encoder(BertLayer, "layer", cfg, name="encoder")(hidden, mask)
        hidden = deep_adapter(BertLayer, cfg, hidden, mask)
        # The pooler is built whenever the checkpoint has one, so its weights round-trip.
        pooler_out = BertPooler(cfg, name="pooler")(hidden[:, 0]) if cfg.add_pooling_layer else None
        mode = cfg.pooling_mode
        if mode == "cls":
            pooled = hidden[:, 0]
        elif mode == "mean":
            pooled = masked_mean(hidden, attention_mask)
        else:
            pooled = pooler_out
        return {"last_hidden_state": hidden, "pooled": pooled}


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, cls_hidden):
        return nn.tanh(dense(self.config, self.config.hidden_size, "dense")(cls_hidden))


# BERT presets have no pooler: the towers pool [CLS] (LiLT) or the mean, so the pooler's weights
# would sit unused (and inflate the trainable counts of LiLT's Table 1).

FAMILY = register(TowerFamily(
    config=BertConfig, module=BertTower, modality="text",
    hf_class="BertModel", weight_prefixes=("", "bert"),
    norm_names=("LayerNorm",),
    presets={
        "bert_base": lambda: BertConfig(**BASE_SHAPE, add_pooling_layer=False),   # bert-base, SimCSE
        "bert_large": lambda: BertConfig(**LARGE_SHAPE, add_pooling_layer=False),
        "minilm_l12": lambda: BertConfig(hidden_size=384, num_hidden_layers=12,
                                         num_attention_heads=12, intermediate_size=1536,
                                         add_pooling_layer=False),
        "bert_tiny": lambda: BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, vocab_size=512,
                                        max_position_embeddings=64, add_pooling_layer=False),
        "bert_tiny_l4": lambda: BertConfig(hidden_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, intermediate_size=128,
                                           vocab_size=512, max_position_embeddings=64,
                                           add_pooling_layer=False),
    }))
