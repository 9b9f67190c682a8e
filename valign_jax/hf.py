"""Hugging Face checkpoints in and out, without transformers' model classes.

    tower, params = hf.load_tower("google/vit-base-patch16-224")       # or a local directory
    tower, params = hf.load_tower("openai/clip-vit-base-patch32", part="text")
    model, params = hf.load_dual_encoder("openai/clip-vit-base-patch32")
    model, params = hf.load_dual_encoder("google/siglip-base-patch16-224")  # + logit_bias
    hf.save_tower(tower, params, "out/")                                # loads in transformers
    hf.save_dual_encoder(model, params, "out/")                         # a SiglipModel again

Reads `config.json` and the weights from `model.safetensors` (PyTorch layout, or sharded with
`model.safetensors.index.json`) or `flax_model.msgpack` (Flax layout). PyTorch layout is converted
by the expected parameter tree: linear kernels are transposed, conv kernels go OIHW -> HWIO,
LayerNorm `weight` -> `scale`, embedding `weight` -> `embedding`.

Loading runs no code from a checkpoint: pickled `pytorch_model.bin` is never opened (unpickling
can run code), hub downloads fetch only weights, JSON and vocabulary files (never *.py or *.bin),
and a config.json with `auto_map` (a model's own modelling code) is read as plain JSON: the
architecture is this package's implementation of its `model_type`, the weights are checked
name by name and shape by shape, and a warning says that its code was not run. Hub ids go
through huggingface_hub's cache.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import jax
import numpy as np
from flax import serialization, traverse_util

# Reading a checkpoint's files (checked: locations, file types, headers, config values) lives in
# hf_files; resolve / read_config / read_weights stay importable from here.
from valign_jax.hf_files import (HUB_PATTERNS, MSGPACK, PICKLES, SAFETENSORS,  # noqa: F401
                                 SAFETENSORS_INDEX, MissingTensorError, read_config,
                                 read_weights, resolve)
from valign_jax.models import DualEncoder, registry
from valign_jax.models.config import TowerConfig
from valign_jax.models.layers import interpolate_patch_positions
from valign_jax.models.layout import (abstract_params, scanned_layer_paths, stack_layers,
                                      unstack_layers)
from valign_jax.models.registry import dummy_inputs, tower_for

log = logging.getLogger(__name__)

# Which model_types load, where their weights sit and which transformers class they save as:
# the tower families' registrations (models/registry.py), read there.


# ---------------------------------------------------------------------------------------------
# Converting between a checkpoint's flat keys and our parameter tree
# ---------------------------------------------------------------------------------------------

_PT_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_PT_ALIASES = {"weight": ("gamma",), "bias": ("beta",)}  # old TF-converted LayerNorm names


def _to_pytorch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        # conv HWIO -> OIHW; linear (in, out) -> (out, in)
        return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return value


def _from_pytorch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    return value


def checkpoint_key(path: tuple[str, ...], layout: str, prefix: str = "") -> str:
    """The flat checkpoint key holding our parameter at `path`."""
    parts = list(path)
    if layout == "pytorch":
        parts[-1] = _PT_LEAF.get(parts[-1], parts[-1])
    return ".".join(([prefix] if prefix else []) + parts)


def _position_table(path, value, spec, tables) -> int | None:
    """For a position table stored for another image size (same width): how many rows lead
    its patch grid (`tables`: the image tower family's `position_table`); else None."""
    name = "/".join(path)
    for suffix, prefix_tokens in tables.items():
        if name.endswith(suffix) and value.ndim == len(spec.shape) \
                and value.shape[-1] == spec.shape[-1]:
            return prefix_tokens
    return None


def _resize_position_table(value: np.ndarray, shape, prefix_tokens: int) -> np.ndarray:
    """The leading rows ([CLS]) kept, the patch grid bicubically resized (as HF interpolates at
    run time): a 224-px checkpoint stored for 256 px, as LiLT trains DeiT-B."""
    width = value.shape[-1]
    table = value.reshape(-1, width)
    side = int(round(math.sqrt(int(np.prod(shape)) // width - prefix_tokens)))
    patches = interpolate_patch_positions(jax.numpy.asarray(table[prefix_tokens:]), (side, side))
    return np.concatenate([table[:prefix_tokens], np.asarray(patches)], axis=0).reshape(shape)


def _find_prefix(flat, expected, layout, prefixes, file) -> str:
    first = next(iter(expected))
    for prefix in prefixes:
        if checkpoint_key(first, layout, prefix) in flat:
            return prefix
    sample = sorted(flat)[:5]
    raise MissingTensorError(
        f"{file}: found no '{checkpoint_key(first, layout)}' under any of the prefixes "
        f"{list(prefixes)}; the file's keys start {sample}. Is this the right model_type?")


def _image_position_tables(module) -> dict[str, int]:
    """{path suffix: prefix rows} of the position table of `module`'s image tower (a tower or a
    DualEncoder), which loading may resize."""
    if hasattr(module, "image_config"):
        return {f"vision_model/{suffix}": rows for suffix, rows
                in registry.position_tables(module.image_config).items()}
    if registry.modality(module.config) != "image":
        return {}
    return registry.position_tables(module.config)


def convert(flat: dict, layout: str, expected: dict, prefix: str, file: Path,
            position_tables: dict | None = None) -> dict:
    """Our flat {path: array} from a checkpoint's flat weights, checked against `expected` shapes.
    position_tables: {path suffix: prefix rows} of tables to resize when stored for another
    image size (default: every family's)."""
    tables = registry.position_tables() if position_tables is None else position_tables
    params, used = {}, set()
    for path, spec in expected.items():
        key = checkpoint_key(path, layout, prefix)
        if key not in flat and layout == "pytorch":
            leaf = key.rsplit(".", 1)[-1]
            for alias in _PT_ALIASES.get(leaf, ()):
                if key[: -len(leaf)] + alias in flat:
                    key = key[: -len(leaf)] + alias
        if key not in flat:
            raise MissingTensorError(
                f"{file} has no tensor '{key}' for parameter '{'/'.join(path)}' "
                f"(expected shape {tuple(spec.shape)})")
        value = np.asarray(flat[key])
        if layout == "pytorch":
            value = _from_pytorch(path[-1], value)
        if spec.shape == () and value.shape == (1,):
            value = value.reshape(())  # SiglipModel keeps logit_scale / logit_bias as (1,)
        prefix_tokens = _position_table(path, value, spec, tables)
        if tuple(value.shape) != tuple(spec.shape) and prefix_tokens is not None:
            log.info("%s: resizing %s from %s to %s", file, key, value.shape, tuple(spec.shape))
            value = _resize_position_table(value, spec.shape, prefix_tokens)
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(f"parameter '{'/'.join(path)}': {file} key '{key}' has shape "
                             f"{tuple(value.shape)} but the config expects {tuple(spec.shape)}")
        params[path] = value.astype(np.float32) if value.dtype != np.float32 else value
        used.add(key)
    unused = [k for k in flat if k.startswith(prefix) and k not in used]
    if unused:
        log.info("%s: %d tensors not used by this model (e.g. %s)", file, len(unused), unused[:3])
    return params


def _load_into(module, inputs, checkpoint, prefixes):
    """Params of `module` (unrolled or scanned) from `checkpoint` = read_weights(...)."""
    flat, layout, file = checkpoint
    scanned = scanned_layer_paths(module)
    unrolled = module
    if scanned:  # checkpoints are unrolled: read into the unrolled twin, then stack
        unrolled = tower_for(module.config.replace(scan_layers=False)) if hasattr(
            module, "config") else module.clone(
            image_config=module.image_config.replace(scan_layers=False),
            text_config=module.text_config.replace(scan_layers=False))
    expected = traverse_util.flatten_dict(abstract_params(unrolled, **inputs))
    prefix = _find_prefix(flat, expected, layout, prefixes, file)
    params = traverse_util.unflatten_dict(convert(flat, layout, expected, prefix, file,
                                                  _image_position_tables(unrolled)))
    params = stack_layers(params, scanned)
    return jax.tree_util.tree_map(jax.numpy.asarray, params)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def tower_config(hf_config: dict, part: str | None = None, *, source: str = "config.json",
                 **run_options) -> tuple[TowerConfig, tuple[str, ...]]:
    """Our tower config from an HF config dict, and the weight prefixes to try."""
    model_type = hf_config.get("model_type")
    composites = registry.composite_types()
    if model_type in composites:
        parts = composites[model_type]
        if part not in parts:
            choices = " or ".join(f"part={p!r}" for p in sorted(parts))
            raise ValueError(f"{source} is a two-tower {model_type!r} checkpoint: pass "
                             f"{choices} to load one tower, or use hf.load_dual_encoder")
        sub = hf_config.get(f"{part}_config") or hf_config.get(f"{part}_config_dict") or {}
        family = parts[part]
        return family.config.from_hf(sub, **run_options), family.weight_prefixes
    try:
        family = registry.family(str(model_type))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    if not family.hf_class:  # e.g. precomputed features: no checkpoint has this type
        raise ValueError(f"{source}: model_type={model_type!r} is not a checkpoint type")
    if part is not None:
        raise ValueError(f"part={part!r} applies to two-tower checkpoints only "
                         f"({sorted(composites)}); {source} has model_type={model_type!r}")
    return family.config.from_hf(hf_config, **run_options), family.weight_prefixes


def load_tower(path_or_hub_id, part: str | None = None, **run_options):
    """(tower module, params) of a single-tower checkpoint (BERT, ViT, DINOv2, CLIP, SigLIP,
    SigLIP 2 text or vision), or of one half of a two-tower one (`part`="vision" | "text").

    run_options set this codebase's options on the tower config: dtype="bfloat16",
    scan_layers=True, remat="full", pooling="mean", ...
    """
    directory = resolve(path_or_hub_id)
    config, prefixes = tower_config(read_config(directory), part,
                                    source=str(directory / "config.json"), **run_options)
    checkpoint = read_weights(directory)
    if getattr(config, "add_pooling_layer", False) and not any("pooler" in k for k in checkpoint[0]):
        config = config.replace(add_pooling_layer=False)  # DeiT/DINO checkpoints carry no pooler
    tower = tower_for(config)
    return tower, _load_into(tower, dummy_inputs(config), checkpoint, prefixes)


def load_dual_encoder(path_or_hub_id, **run_options):
    """(DualEncoder, params) of a full two-tower checkpoint: CLIP (towers, linear projections,
    logit scale) or SigLIP / SigLIP 2 (towers with their own heads, logit scale and bias).
    The checkpoint types are the registered `DualCheckpoint`s (models/registry.py)."""
    directory = resolve(path_or_hub_id)
    hf_config = read_config(directory)
    kind = registry.dual_checkpoint(hf_config.get("model_type"), str(directory / "config.json"))
    image_config, _ = tower_config(hf_config, "vision", **run_options)
    text_config, _ = tower_config(hf_config, "text", **run_options)
    model = DualEncoder(image_config, text_config, image_head=kind.heads, text_head=kind.heads,
                        **kind.settings(hf_config, image_config, text_config))
    return model, _load_into(model, model.dummy_inputs(), read_weights(directory), ("",))


def _write(directory: Path, hf_config: dict, module, params, prefix: str, formats,
           logit_shape: tuple[int, ...] = ()):
    directory.mkdir(parents=True, exist_ok=True)
    params = unstack_layers(jax.device_get(params), scanned_layer_paths(module))
    flat = traverse_util.flatten_dict(params)
    if "safetensors" in formats:
        from safetensors.numpy import save_file
        # np.array(order="C"), not np.ascontiguousarray: that turns the 0-d logit_scale into
        # shape (1,), which HF's CLIPModel (a 0-d parameter) and our loader refuse. SiglipModel
        # wants exactly that shape: `logit_shape`.
        def tensor(path, value):
            value = np.array(_to_pytorch(path[-1], np.asarray(value, np.float32)), order="C")
            return value.reshape(logit_shape) if path in _LOGIT_PATHS else value
        tensors = {checkpoint_key(p, "pytorch", prefix): tensor(p, v) for p, v in flat.items()}
        save_file(tensors, directory / SAFETENSORS, metadata={"format": "pt"})
    if "msgpack" in formats:
        tree = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), params)
        (directory / MSGPACK).write_bytes(serialization.msgpack_serialize(
            {prefix: tree} if prefix else tree))
    with open(directory / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)


_LOGIT_PATHS = (("logit_scale",), ("logit_bias",))


def save_tower(tower, params, out_dir, formats=("safetensors", "msgpack")):
    """Write an HF-loadable directory: config.json plus model.safetensors (PyTorch layout) and
    flax_model.msgpack, so both transformers' PyTorch and Flax classes load it."""
    config = tower.config
    family = registry.family_of(config)
    hf_config = {**config.to_hf(), "architectures": [family.hf_class]}
    _write(Path(out_dir), hf_config, tower, params, family.weight_prefixes[0], formats)


def save_dual_encoder(model: DualEncoder, params, out_dir, formats=("safetensors", "msgpack")):
    """Write a dual encoder as the two-tower checkpoint its towers belong to: CLIP towers with
    bias-free linear heads as an HF CLIPModel, SigLIP / SigLIP 2 towers (identity heads, a logit
    bias) as a SiglipModel / Siglip2Model."""
    kind = registry.dual_checkpoint_of(model.image_config, model.text_config)
    bias = model.logit_bias_init is not None
    if (kind is None or model.image_head != kind.heads or model.text_head != kind.heads
            or (kind.heads == "linear" and model.head_bias) or bias != kind.logit_bias
            or model.fusion_layers):
        expected = (f"{kind.hf_class} wants {kind.heads!r} heads without bias"
                    f"{', a logit bias' if kind.logit_bias else ', no logit bias'} and no "
                    f"fusion layers" if kind else "no two-tower type has these towers")
        raise ValueError(
            f"this dual encoder ({type(model.image_config).__name__} + "
            f"{type(model.text_config).__name__}, heads {model.image_head!r}/"
            f"{model.text_head!r}, head_bias={model.head_bias}, logit bias {bias}, "
            f"fusion_layers={model.fusion_layers}) has no Hugging Face two-tower layout "
            f"({expected}); save each tower with hf.save_tower instead")
    hf_config = {"model_type": kind.model_type, "architectures": [kind.hf_class],
                 **kind.config_fields(model),
                 "text_config": model.text_config.to_hf(),
                 "vision_config": model.image_config.to_hf()}
    _write(Path(out_dir), hf_config, model, params, "", formats, kind.logit_shape)
