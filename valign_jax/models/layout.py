"""Parameter-tree layouts: shapes without compute, pretrained weights laid over fresh ones, and
the unrolled <-> scanned layer layouts (HF checkpoints are unrolled: `encoder/layer/0/...`; a
scanned tower stacks the layers on a leading axis: `encoder/layer/...`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from valign_jax.models.registry import tower_for


def abstract_params(module, *args, **kwargs):
    """Parameter shapes (ShapeDtypeStructs) of `module`, without computing anything. With no
    inputs given, the module's own `dummy_inputs()` (a DualEncoder's) trace it."""
    if not args and not kwargs:
        kwargs = module.dummy_inputs()
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
