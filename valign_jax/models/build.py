"""The dual encoder a config describes (`config.model`), and its pretrained tower weights.

Reads attributes only, so it needs no ml_collections; the architecture comes from a preset, or
from the checkpoint's config.json when one is named and `use_checkpoint_config` is set (a dry run
reads nothing and uses the preset).
"""

from __future__ import annotations

from valign_jax import losses
from valign_jax.models.dual_encoder import DualEncoder
from valign_jax.models.presets import preset


def tower_config(tower_cfg, model_cfg, side: str, use_checkpoint_config: bool):
    """A tower config from one `config.model.image|text` entry; side is "image" or "text"."""
    overrides = dict(dtype=model_cfg.dtype, scan_layers=model_cfg.scan_layers,
                     remat=model_cfg.remat, adapter_init=model_cfg.adapter_init,
                     adapter_dim=tower_cfg.adapter_dim, deep_layers=tower_cfg.deep_layers)
    if tower_cfg.pooling:
        overrides["pooling"] = tower_cfg.pooling
    if side == "image" and tower_cfg.image_size:
        overrides["image_size"] = tower_cfg.image_size
    if tower_cfg.checkpoint and use_checkpoint_config:
        from valign_jax import hf
        directory = hf.resolve(tower_cfg.checkpoint)
        hf_config = hf.read_config(directory)
        part = ("vision" if side == "image" else "text") if hf_config.get("model_type") == "clip" \
            else None
        config, _ = hf.tower_config(hf_config, part, source=str(directory / "config.json"),
                                    **overrides)
        return config
    return preset(tower_cfg.preset, **overrides)


def build_dual_encoder(model_cfg, use_checkpoint_config: bool = True) -> DualEncoder:
    logit = losses.LOGIT_SCALE_PRESETS[model_cfg.logit_preset]
    return DualEncoder(
        image_config=tower_config(model_cfg.image, model_cfg, "image", use_checkpoint_config),
        text_config=tower_config(model_cfg.text, model_cfg, "text", use_checkpoint_config),
        projection_dim=model_cfg.projection_dim,
        image_head=model_cfg.image_head,
        text_head=model_cfg.text_head,
        head_bias=model_cfg.head_bias,
        logit_scale_init=logit.init_log_scale,
        logit_bias_init=logit.init_bias,
    )
