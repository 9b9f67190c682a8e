"""The dual encoder: an image tower and a text tower, a head on each, a learnable logit scale
(and, for sigmoid recipes, a bias).

Either tower may be a `FeaturesConfig`: precomputed features (SAIL's cached frozen-tower
outputs) pass straight to the head.

Submodule names follow HF's CLIPModel (`vision_model`, `text_model`, `visual_projection`,
`text_projection`, `logit_scale`), so a CLIP checkpoint loads by name, whatever towers are used.
`encode_image` / `encode_text` return projected features, not L2-normalised: the losses and
metrics normalise where their formulas say so, and RaFA acts on the un-normalised features.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn

from valign_jax.models.config import TowerConfig
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

    def encode_image(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values)["pooled"])

    def encode_text(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask)["pooled"])

    def __call__(self, pixel_values, input_ids, attention_mask=None) -> dict[str, Any]:
        out = {"image": self.encode_image(pixel_values),
               "text": self.encode_text(input_ids, attention_mask),
               "logit_scale": self.logit_scale}
        if self.logit_bias_init is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def dummy_inputs(self, batch: int = 1) -> dict:
        text = dummy_inputs(self.text_config, batch)
        return {**dummy_inputs(self.image_config, batch), **text}

