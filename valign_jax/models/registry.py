"""Which tower class a config builds, dummy inputs to trace it, and the unrolled <-> scanned
parameter layouts (HF checkpoints are unrolled: `encoder/layer/0/...`; a scanned tower stacks the
layers on a leading axis: `encoder/layer/...`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from valign_jax.models.bert import BertConfig, BertTower
from valign_jax.models.clip_text import CLIPTextConfig, CLIPTextTower
from valign_jax.models.config import TowerConfig
from valign_jax.models.vit import (CLIPVisionConfig, CLIPVisionTower, DINOv2Config, ViTConfig,
                                   ViTTower)

@dataclasses.dataclass(frozen=True)
class FeaturesConfig:
    """A "tower" whose inputs are precomputed (B, dim) features, e.g. SAIL's feature cache."""

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


TOWERS = {FeaturesConfig: FeaturesTower, BertConfig: BertTower, CLIPTextConfig: CLIPTextTower,
          ViTConfig: ViTTower, DINOv2Config: ViTTower, CLIPVisionConfig: CLIPVisionTower}
TEXT_CONFIGS = (BertConfig, CLIPTextConfig)


def tower_for(config: TowerConfig, **module_kwargs):
    """The Flax tower module for a tower config."""
    try:
        return TOWERS[type(config)](config, **module_kwargs)
    except KeyError:
        raise TypeError(f"no tower for config type {type(config).__name__}; known: "
                        f"{[c.__name__ for c in TOWERS]}") from None


def is_text(config: TowerConfig) -> bool:
    if isinstance(config, FeaturesConfig):
        return config.modality == "text"
    return isinstance(config, TEXT_CONFIGS)


def dummy_inputs(config: TowerConfig, batch: int = 1) -> dict:
    """Keyword inputs of the right shapes to trace a tower (values are irrelevant)."""
    if isinstance(config, FeaturesConfig):
        key = "input_ids" if config.modality == "text" else "pixel_values"
        return {key: jnp.zeros((batch, config.dim), jnp.float32)}
    if is_text(config):
        ids = jnp.ones((batch, 8), jnp.int32)
        return {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    side = config.image_size
    return {"pixel_values": jnp.zeros((batch, side, side, config.num_channels), jnp.float32)}


def abstract_params(module, *args, **kwargs):
    """Parameter shapes (ShapeDtypeStructs) of `module`, without computing anything."""
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kwargs)
    return variables["params"]


def overlay(params, pretrained, where: str = "params"):
    """`params` with every leaf that `pretrained` also has replaced by the pretrained value:
    fresh adapters, deep layers and heads keep their init, the rest comes from the checkpoint."""
    out = dict(params)
    for key, value in pretrained.items():
        if key not in params:
            raise KeyError(f"{where}/{key} is in the pretrained weights but not in the model")
        if isinstance(value, dict):
            out[key] = overlay(params[key], value, f"{where}/{key}")
        elif tuple(params[key].shape) != tuple(value.shape):
            raise ValueError(f"{where}/{key}: pretrained shape {tuple(value.shape)} but the model "
                             f"expects {tuple(params[key].shape)}")
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Scanned <-> unrolled layer layouts
# ---------------------------------------------------------------------------------------------

def scanned_layer_paths(module) -> tuple[tuple[str, ...], ...]:
    """Paths of the layer stacks `module` keeps scanned (stacked on a leading layer axis)."""
    if hasattr(module, "image_config"):  # a DualEncoder: one stack per tower
        image = scanned_layer_paths(tower_for(module.image_config))
        text = scanned_layer_paths(tower_for(module.text_config))
        return (tuple(("vision_model",) + p for p in image)
                + tuple(("text_model",) + p for p in text))
    return module.LAYER_PATHS if module.config.scan_layers else ()


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _replaced(tree, path, value):
    """A copy of nested dict `tree` with tree[path] = value (other branches shared)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _replaced(tree[path[0]], path[1:], value)
    return out


def stack_layers(params, layer_paths, num_layers: int | None = None):
    """Unrolled -> scanned: `<path>/<i>/w` for i < n becomes `<path>/w` with a leading axis n."""
    for path in layer_paths:
        layers = _get(params, path)
        n = len(layers)
        if num_layers is not None and n != num_layers:
            raise ValueError(f"{'/'.join(path)} holds {n} layers; the config says {num_layers}")
        stack = lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)
        stacked = jax.tree_util.tree_map(stack, *[layers[str(i)] for i in range(n)])
        params = _replaced(params, path, stacked)
    return params


def unstack_layers(params, layer_paths):
    """Scanned -> unrolled, the inverse of stack_layers."""
    for path in layer_paths:
        stacked = _get(params, path)
        n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        layers = {str(i): jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(n)}
        params = _replaced(params, path, layers)
    return params
