"""Architecture presets by name: the shapes of the published checkpoints, so configs can build
models (and `--dry_run` count parameters) without reading any weights. `tiny` presets build the
small towers the demos and tests train."""

from __future__ import annotations

from valign_jax.models.bert import BertConfig
from valign_jax.models.clip_text import CLIPTextConfig
from valign_jax.models.vit import CLIPVisionConfig, DINOv2Config, ViTConfig

_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
              intermediate_size=4096)
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)

PRESETS = {
    # text towers
    # BERT presets have no pooler: the towers pool [CLS] (LiLT) or the mean, so the pooler's
    # weights would sit unused (and inflate the trainable counts of Table 1).
    "bert_base": lambda: BertConfig(**_BASE, add_pooling_layer=False),   # bert-base, SimCSE
    "bert_large": lambda: BertConfig(**_LARGE, add_pooling_layer=False),
    "minilm_l12": lambda: BertConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=1536, add_pooling_layer=False),
    "clip_b32_text": lambda: CLIPTextConfig(),
    "clip_l14_text": lambda: CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                            num_attention_heads=12, projection_dim=768),
    "bert_tiny": lambda: BertConfig(**_TINY, vocab_size=512, max_position_embeddings=64,
                                    add_pooling_layer=False),
    "clip_tiny_text": lambda: CLIPTextConfig(**_TINY, vocab_size=512, max_position_embeddings=32,
                                             eos_token_id=3, projection_dim=64),
    # image towers
    "vit_b16": lambda: ViTConfig(**_BASE, patch_size=16, add_pooling_layer=False),  # DeiT/DINO
    "vit_b32": lambda: ViTConfig(**_BASE, patch_size=32, add_pooling_layer=False),
    "vit_l16": lambda: ViTConfig(**_LARGE, patch_size=16, add_pooling_layer=False),
    "clip_b32_vision": lambda: CLIPVisionConfig(**_BASE, patch_size=32),
    "clip_b16_vision": lambda: CLIPVisionConfig(**_BASE, patch_size=16),
    "clip_l14_vision": lambda: CLIPVisionConfig(**_LARGE, patch_size=14),
    # DINOv2 (facebook/dinov2-*): 518 px, patch 14, mlp_ratio 4, LayerScale; giant uses SwiGLU
    "dinov2_s14": lambda: DINOv2Config(hidden_size=384, num_hidden_layers=12,
                                       num_attention_heads=6, image_size=518),
    "dinov2_b14": lambda: DINOv2Config(hidden_size=768, num_hidden_layers=12,
                                       num_attention_heads=12, image_size=518),
    "dinov2_l14": lambda: DINOv2Config(hidden_size=1024, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=518),
    "dinov2_g14": lambda: DINOv2Config(hidden_size=1536, num_hidden_layers=40,
                                       num_attention_heads=24, image_size=518,
                                       use_swiglu_ffn=True),
    "vit_tiny": lambda: ViTConfig(**_TINY, image_size=32, patch_size=8, add_pooling_layer=False),
    "dinov2_tiny": lambda: DINOv2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8),
    "clip_tiny_vision": lambda: CLIPVisionConfig(**_TINY, image_size=32, patch_size=8,
                                                 projection_dim=64),
}


def preset(name: str, **overrides):
    """A tower config by preset name, with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown architecture preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
