"""Flax towers with Hugging Face parameter names, and the dual encoder built from them.

Importing this package registers the built-in tower families (models/registry.py): BERT, ViT
(ViT/DeiT/DINO), DINOv2, CLIP text and CLIP vision, and precomputed features.
"""

from valign_jax.models.bert import BertConfig, BertTower
from valign_jax.models.clip_text import CLIPTextConfig, CLIPTextTower
from valign_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTower
from valign_jax.models.dual_encoder import DualEncoder
from valign_jax.models.features import FeaturesConfig, FeaturesTower
from valign_jax.models.vit import DINOv2Config, ViTConfig, ViTTower

__all__ = [
    "BertConfig", "BertTower", "CLIPTextConfig", "CLIPTextTower", "ViTConfig", "ViTTower",
    "CLIPVisionConfig", "CLIPVisionTower", "DINOv2Config", "DualEncoder", "FeaturesConfig",
    "FeaturesTower",
]
