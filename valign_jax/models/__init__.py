"""Flax towers with Hugging Face parameter names, and the dual encoder built from them.

Importing this package registers the built-in tower families (models/registry.py): BERT, ViT
(ViT/DeiT/DINO), DINOv2, CLIP text and CLIP vision, SigLIP and SigLIP 2 (NaFlex) text and
vision, and precomputed features.
"""

from valign_jax.models.bert import BertConfig, BertTower
from valign_jax.models.clip_text import CLIPTextConfig, CLIPTextTower
from valign_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTower
from valign_jax.models.dual_encoder import DualEncoder
from valign_jax.models.features import FeaturesConfig, FeaturesTower
from valign_jax.models.siglip import (SiglipTextConfig, SiglipTextTower, SiglipVisionConfig,
                                      SiglipVisionTower)
from valign_jax.models.siglip2 import (Siglip2TextConfig, Siglip2VisionConfig,
                                       Siglip2VisionTower)
from valign_jax.models.vit import DINOv2Config, ViTConfig, ViTTower

__all__ = [
    "BertConfig", "BertTower", "CLIPTextConfig", "CLIPTextTower", "ViTConfig", "ViTTower",
    "CLIPVisionConfig", "CLIPVisionTower", "DINOv2Config", "DualEncoder", "FeaturesConfig",
    "FeaturesTower", "SiglipTextConfig", "SiglipTextTower", "SiglipVisionConfig",
    "SiglipVisionTower", "Siglip2TextConfig", "Siglip2VisionConfig", "Siglip2VisionTower",
]
