"""The dual encoder: an image tower and a text tower, a head on each, a learnable logit scale
(and, for sigmoid recipes, a bias).

Either tower may be a `FeaturesConfig`: precomputed features (SAIL's cached frozen-tower
outputs) pass straight to the head.

Submodule names follow HF's CLIPModel (`vision_model`, `text_model`, `visual_projection`,
`text_projection`, `logit_scale`), so a CLIP checkpoint loads by name, whatever towers are used.
`encode_image` / `encode_text` return projected features, not L2-normalised: the losses and
metrics normalise where their formulas say so, and RaFA acts on the un-normalised features.

With `fusion_layers > 0` the model also has cross-modal interaction layers (`fusion`,
models/fusion.py): `__call__` then returns both towers' tokens and the match logits of the
batch's own pairs, and `match_logits` scores any other pairing of those tokens.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from valign_jax.models.config import TowerConfig
from valign_jax.models.fusion import FusionHead
from valign_jax.models.layers import make_head
from valign_jax.models.registry import dummy_inputs, is_text, tower_for


class DualEncoder(nn.Module):
    image_config: TowerConfig
    text_config: TowerConfig
    projection_dim: int = 512
    image_head: str = "linear"
    text_head: str = "linear"
    head_bias: bool = False                  # CLIP and LiLT (Table 3 counts): no bias
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None     # set for sigmoid recipes (SigLIP: -10)
    fusion_layers: int = 0                   # > 0: cross-modal interaction layers + ITM head
    fusion_heads: int = 4
    fusion_width: int = 0                    # 0: the text tower's width

    def setup(self):
        if is_text(self.image_config) or not is_text(self.text_config):
            raise ValueError(f"DualEncoder needs an image tower config and a text tower config; "
                             f"got image_config={type(self.image_config).__name__}, "
                             f"text_config={type(self.text_config).__name__}")
        self.vision_model = tower_for(self.image_config)
        self.text_model = tower_for(self.text_config)
        self.visual_projection = make_head(self.image_head, self.projection_dim, self.head_bias,
                                           "visual_projection")
        self.text_projection = make_head(self.text_head, self.projection_dim, self.head_bias,
                                         "text_projection")
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(
            self.logit_scale_init), ())
        if self.logit_bias_init is not None:
            self.logit_bias = self.param("logit_bias", nn.initializers.constant(
                self.logit_bias_init), ())
        if self.fusion_layers:
            self.fusion = FusionHead(self.fusion_layers, self.fusion_heads, self.fusion_width)

    def encode_image(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values)["pooled"])

    def encode_text(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask)["pooled"])

    def encode_image_tokens(self, pixel_values):
        """(projected features, last hidden state): what retrieval and re-ranking need."""
        tower = self.vision_model(pixel_values)
        return self.visual_projection(tower["pooled"]), tower["last_hidden_state"]

    def encode_text_tokens(self, input_ids, attention_mask=None):
        tower = self.text_model(input_ids, attention_mask)
        return self.text_projection(tower["pooled"]), tower["last_hidden_state"]

    def match_logits(self, image_tokens, text_tokens, text_mask):
        """Image–text-match logits of the pairs (image_tokens[p], text_tokens[p])."""
        return self.fusion(image_tokens, text_tokens, text_mask)

    def __call__(self, pixel_values, input_ids, attention_mask=None) -> dict[str, Any]:
        if self.fusion_layers:
            image, image_tokens = self.encode_image_tokens(pixel_values)
            text, text_tokens = self.encode_text_tokens(input_ids, attention_mask)
            mask = jnp.ones(input_ids.shape[:2], jnp.int32) if attention_mask is None \
                else attention_mask
            out = {"image": image, "text": text, "image_tokens": image_tokens,
                   "text_tokens": text_tokens, "text_mask": mask,
                   "match_logits": self.match_logits(image_tokens, text_tokens, mask)}
        else:
            out = {"image": self.encode_image(pixel_values),
                   "text": self.encode_text(input_ids, attention_mask)}
        out["logit_scale"] = self.logit_scale
        if self.logit_bias_init is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def dummy_inputs(self, batch: int = 1) -> dict:
        text = dummy_inputs(self.text_config, batch)
        return {**dummy_inputs(self.image_config, batch), **text}

