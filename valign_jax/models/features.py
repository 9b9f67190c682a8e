"""A "tower" whose inputs are precomputed (B, dim) features: SAIL's feature cache trains the
heads of a DualEncoder whose towers were run once, ahead of training, and stored.

The features stand for either tower, so the config says which (`modality`); they pass straight
to the heads.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from valign_jax.models.registry import TowerFamily, register


@dataclasses.dataclass(frozen=True)
class FeaturesConfig:
    """Precomputed features of `dim` width standing for the `modality` tower."""

    model_type: ClassVar[str] = "precomputed_features"

    dim: int
    modality: str  # "image" or "text"
    scan_layers: bool = False

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


class FeaturesTower(nn.Module):
    config: FeaturesConfig
    LAYER_PATHS: ClassVar[tuple] = ()

    @nn.compact
    def __call__(self, features, attention_mask=None):
        if features.shape[-1] != self.config.dim:
            raise ValueError(f"precomputed {self.config.modality} features have width "
                             f"{features.shape[-1]}; the config says {self.config.dim}")
        return {"pooled": features}


def _inputs(config: FeaturesConfig, batch: int) -> dict:
    key = "input_ids" if config.modality == "text" else "pixel_values"
    return {key: jnp.zeros((batch, config.dim), jnp.float32)}


FAMILY = register(TowerFamily(config=FeaturesConfig, module=FeaturesTower, modality=None,
                              dummy_inputs=_inputs))
