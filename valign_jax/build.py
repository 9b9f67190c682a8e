"""The dual encoder a config describes (`config.model`), and its pretrained tower weights.

Reads attributes only, so it needs no ml_collections; the architecture comes from a preset, or
from the checkpoint's config.json when one is named and `use_checkpoint_config` is set (a dry run
reads nothing and uses the preset).
"""

from __future__ import annotations

import dataclasses

import json

from valign_jax import hf, losses
from valign_jax.models import registry
from valign_jax.models.dual_encoder import DualEncoder
from valign_jax.special_tokens import SPECIAL_IDS

_HEAD_FIELDS = ("projection_dim", "image_head", "text_head", "head_bias", "logit_scale_init",
                "logit_bias_init", "fusion_layers", "fusion_heads", "fusion_width")


def _overrides(tower_cfg, model_cfg, side: str) -> dict:
    """Run options and shape overrides the config sets on one tower."""
    overrides = dict(dtype=model_cfg.dtype, scan_layers=model_cfg.scan_layers,
                     remat=model_cfg.remat, adapter_init=model_cfg.adapter_init,
                     attention_impl=model_cfg.get("attention_impl", "auto"),
                     adapter_dim=tower_cfg.adapter_dim, deep_layers=tower_cfg.deep_layers)
    if tower_cfg.pooling:
        overrides["pooling"] = tower_cfg.pooling
    if side == "image" and tower_cfg.image_size:
        overrides["image_size"] = tower_cfg.image_size
    return overrides


def _part(hf_config: dict, side: str):
    """Which half of a two-tower checkpoint (e.g. a full CLIP) a tower reads; None for
    single-tower checkpoints."""
    if hf_config.get("model_type") not in registry.composite_types():
        return None
    return "vision" if side == "image" else "text"


def tower_config(tower_cfg, model_cfg, side: str, use_checkpoint_config: bool):
    """A tower config from one `config.model.image|text` entry; side is "image" or "text"."""
    overrides = _overrides(tower_cfg, model_cfg, side)
    if tower_cfg.checkpoint and use_checkpoint_config:
        directory = hf.resolve(tower_cfg.checkpoint)
        hf_config = hf.read_config(directory)
        config, _ = hf.tower_config(hf_config, _part(hf_config, side),
                                    source=str(directory / "config.json"), **overrides)
        return config
    config = registry.preset(tower_cfg.preset, **overrides)
    return _scratch_token_ids(config) if side == "text" else config


def _scratch_token_ids(config):
    """A text tower built from a preset reads the special-token ids of the tokenizers made
    for scratch towers (special_tokens.py): its end-of-text pooling must find their [EOS]."""
    fields = {f.name for f in dataclasses.fields(config)}
    ids = {f"{k}_token_id": v for k, v in SPECIAL_IDS.items() if f"{k}_token_id" in fields}
    return config.replace(**ids) if ids else config


def pretrained_towers(model_cfg) -> dict:
    """{"vision_model": params, "text_model": params} for the towers that name a checkpoint.
    A checkpoint holds no LiLT adapters or deep-adapter layers: the tower is read as saved, and
    the model's fresh adapters keep their init when these weights are laid over it."""
    out = {}
    for side, name in (("image", "vision_model"), ("text", "text_model")):
        tower_cfg = model_cfg[side]
        if tower_cfg.checkpoint:
            directory = hf.resolve(tower_cfg.checkpoint)
            part = _part(hf.read_config(directory), side)
            overrides = {**_overrides(tower_cfg, model_cfg, side), "adapter_dim": 0,
                         "deep_layers": 0}
            _, out[name] = hf.load_tower(directory, part, **overrides)
    return out


def build_dual_encoder(model_cfg, use_checkpoint_config: bool = True,
                       towers=None) -> DualEncoder:
    """The config's DualEncoder; `towers` = (image_config, text_config) replaces the towers the
    config describes (e.g. FeaturesConfigs when training from cached features)."""
    logit = losses.LOGIT_SCALE_PRESETS[model_cfg.logit_preset]
    init_log_scale = model_cfg.get("logit_scale_init")
    init_bias = model_cfg.get("logit_bias_init")
    if towers is None:
        towers = (tower_config(model_cfg.image, model_cfg, "image", use_checkpoint_config),
                  tower_config(model_cfg.text, model_cfg, "text", use_checkpoint_config))
    return DualEncoder(
        image_config=towers[0],
        text_config=towers[1],
        projection_dim=model_cfg.projection_dim,
        image_head=model_cfg.image_head,
        text_head=model_cfg.text_head,
        head_bias=model_cfg.head_bias,
        logit_scale_init=logit.init_log_scale if init_log_scale is None else init_log_scale,
        logit_bias_init=logit.init_bias if init_bias is None or logit.init_bias is None
        else init_bias,
        fusion_layers=model_cfg.get("fusion_layers", 0),
        fusion_heads=model_cfg.get("fusion_heads", 4),
        fusion_width=model_cfg.get("fusion_width", 0),
    )


def describe(model: DualEncoder) -> dict:
    """The model's full architecture as JSON-able data (written to <workdir>/model.json)."""
    def tower(config):
        return {"type": type(config).__name__, **dataclasses.asdict(config)}
    return {"image_config": tower(model.image_config), "text_config": tower(model.text_config),
            **{name: getattr(model, name) for name in _HEAD_FIELDS}}


def from_description(description: dict, source: str = "model.json") -> DualEncoder:
    """The inverse of `describe`."""
    def tower(entry):
        entry = dict(entry)
        kind = entry.pop("type", None)
        try:
            return registry.config_class(str(kind))(**entry)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    heads = {name: description[name] for name in _HEAD_FIELDS if name in description}
    return DualEncoder(tower(description["image_config"]), tower(description["text_config"]),
                       **heads)


# Tower options that change how a step computes, not the parameters a checkpoint holds: a run
# may resume with other values.
COMPUTE_OPTIONS = ("attention_impl", "remat", "dtype")


def description_changes(old: dict, new: dict) -> list[str]:
    """The top-level keys in which two model descriptions (`describe`) differ in what the
    parameters depend on (COMPUTE_OPTIONS may differ)."""
    def parameters_only(description):
        description = json.loads(json.dumps(description))
        for key in ("image_config", "text_config"):
            for option in COMPUTE_OPTIONS:
                description.get(key, {}).pop(option, None)
        return description
    old, new = parameters_only(old), parameters_only(new)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
