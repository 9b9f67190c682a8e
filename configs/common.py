"""Defaults shared by every recipe, and the parsing of config argument strings.

A recipe file defines `get_config(arg)`; `arg` is what follows the colon in
`--config=configs/lilt.py:lilt_lwa,demo`: comma-separated tokens, at most one variant name plus
modifiers (`demo`: tiny towers on the embedded synthetic data, offline).
"""

from __future__ import annotations

import ml_collections

MODIFIERS = ("demo",)


def parse_arg(arg: str | None, variants, default: str, recipe_file: str):
    """(variant, set of modifiers); unknown tokens fail listing the valid ones."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    variant, modifiers = default, set()
    for token in tokens:
        if token in MODIFIERS:
            modifiers.add(token)
        elif token in variants:
            variant = token
        else:
            raise ValueError(f"{recipe_file}: unknown config argument {token!r}; variants: "
                             f"{sorted(variants)}; modifiers: {list(MODIFIERS)}")
    return variant, modifiers


def tower(preset: str, checkpoint: str = "", **fields) -> ml_collections.ConfigDict:
    """One tower: an architecture preset (models/presets.py), optionally a checkpoint to load
    (hub id or local directory; its config.json then decides the architecture), and overrides."""
    defaults = dict(
        preset=preset, checkpoint=checkpoint, pooling="", adapter_dim=0, deep_layers=0,
        image_size=0,    # image towers: 0 keeps the checkpoint's; else positions are resized
        max_length=64,   # text towers: tokens per caption
    )
    unknown = set(fields) - set(defaults)
    if unknown:
        raise ValueError(f"unknown tower fields {sorted(unknown)}; known: {sorted(defaults)}")
    return ml_collections.ConfigDict({**defaults, **fields})


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        image=tower("vit_b16"),
        text=tower("bert_base"),
        projection_dim=256,
        image_head="linear",
        text_head="linear",
        head_bias=False,
        logit_preset="clip",     # losses.LOGIT_SCALE_PRESETS: init and clamp of scale / bias
        adapter_init="normal",   # "identity": adapters start as the identity map
        dtype="float32",         # compute dtype; parameters stay float32
        scan_layers=False,
        remat="none",
    ))
    c.peft = ml_collections.ConfigDict(dict(
        recipe="full",           # peft.RECIPES
        overrides=(),            # ("<regex>=trainable|frozen", ...) over the recipe
    ))
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, warmup_init_lr=1e-5, end_lr=1e-5, warmup_steps=1000,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.02, grad_clip_norm=0.0,
    ))
    return c
