"""Flax towers with Hugging Face parameter names, and the dual encoder built from them."""

from valign_jax.models.bert import BertConfig, BertTower
from valign_jax.models.clip_text import CLIPTextConfig, CLIPTextTower
from valign_jax.models.vit import (ViTConfig, ViTTower, CLIPVisionConfig, CLIPVisionTower,
                                   DINOv2Config)
from valign_jax.models.dual_encoder import DualEncoder
from valign_jax.models.registry import FeaturesConfig

__all__ = [
    "BertConfig", "BertTower", "CLIPTextConfig", "CLIPTextTower", "ViTConfig", "ViTTower",
    "CLIPVisionConfig", "CLIPVisionTower", "DINOv2Config", "DualEncoder",
]
