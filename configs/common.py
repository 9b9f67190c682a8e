"""Defaults shared by every recipe, and the parsing of config argument strings.

A recipe file defines `get_config(arg)`; `arg` is what follows the colon in
`--config=configs/lilt.py:lilt_lwa,demo`: comma-separated tokens, at most one variant name plus
modifiers (`demo`: tiny towers on the embedded synthetic data, offline).

`base_config()` holds every key a config may have, with its type: valign_jax/config_checks.py
refuses a key it lacks (a typo), a value of another type, and options that contradict each other,
naming the key, before a run computes anything. A new option gets its default here.
"""

from __future__ import annotations

import ml_collections

MODIFIERS = ("demo",)


def parse_arg(arg: str | None, variants, default: str, recipe_file: str,
              modifiers=MODIFIERS):
    """(variant, set of modifiers); unknown tokens fail listing the valid ones."""
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    variant, chosen = default, set()
    for token in tokens:
        if token in modifiers:
            chosen.add(token)
        elif token in variants:
            variant = token
        else:
            raise ValueError(f"{recipe_file}: unknown config argument {token!r}; variants: "
                             f"{sorted(variants)}; modifiers: {list(modifiers)}")
    return variant, chosen


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
    c.pretrain = ""              # a config string trained first into <workdir>/pretrain; this
                                 # run then starts from its result (the CLIP-Refine demo)
    c.batch_size = 512           # global: the losses see negatives from every device
    c.num_epochs = 1.0
    c.total_steps = 0            # > 0 overrides num_epochs
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.on_nonfinite = "stop"      # a non-finite loss/gradient: "stop" naming the step, or "skip" it
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1,         # device mesh axes; -1 takes the remaining devices
        min_fsdp_size=2 ** 14,   # arrays smaller than this stay replicated on the fsdp axis
    ))
    c.objective = ml_collections.ConfigDict(dict(
        kind="softmax",          # softmax | sigmoid | clip_refine
        norm="batch",            # sigmoid: "batch" (SigLIP, sum / B) or "pairs" (SAIL, / B^2)
        multi_positive=False,    # sigmoid with the long caption as a second positive (SAIL)
        chunked=False,           # sigmoid: ring-chunked across devices (losses.chunked_sigmoid)
        itm_weight=0.0,          # fusion models: + weight x image-text matching on hard negatives
        itm_negatives=1,         # hard negatives drawn per image and per caption for that loss
        clip_refine=ml_collections.ConfigDict(dict(
            weights=(0.0, 1.0, 1.0),   # lambda for (CLIP, RaFA, HyCD)
            prior_std=1.0,             # RaFA references r ~ N(0, prior_std^2 I)
            rafa_form="official",      # "official" (mean over i, d) or "paper" (= official x D/2)
            alpha=0.5, temperature=1.0,
            hycd_features="raw",       # "raw" (official code) or "normalized"
        )),
    ))
    c.data = ml_collections.ConfigDict(dict(
        train="tfds:coco_captions/train", eval="tfds:coco_captions/test",
        num_train=50_000, num_eval=512,  # synthetic sources only: how many examples
        feature_cache="",        # a directory: train from cached frozen-tower features (SAIL);
                                 # fill it with --mode=cache_features
        seed=0,
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),  # pixels -> [-1, 1]
        lower_case=False,
        threads=2,               # grain threads reading and decoding records
        workers=0,               # grain worker processes (0: threads only)
    ))
    c.eval = ml_collections.ConfigDict(dict(
        zeroshot="",             # zero-shot datasets (comma-separated) reported at every evaluation
        zeroshot_limit=0,        # evaluate on their first N usable images (0: all)
        templates="auto",        # prompts: auto | single | clip80 | clip7 (evaluation/templates.py)
        class_names="",          # per zero-shot dataset, a file of class names (one per line)
        rerank_k=10,             # fusion models: re-rank the dual encoder's top k
        rerank_score="itm+contrastive",  # ... by head + dual logit, or "itm" (evaluation/rerank.py)
        batch_size=256,
    ))
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
        attention_impl="xla",    # "cudnn": the fused attention kernel on NVIDIA GPUs
        init_from="",            # a full CLIP checkpoint or a previous run's workdir
        # None: the logit preset's init (placeholders, so the command line can set them)
        logit_scale_init=ml_collections.config_dict.placeholder(float),
        logit_bias_init=ml_collections.config_dict.placeholder(float),  # sigmoid recipes
        fusion_layers=0,         # > 0: cross-modal interaction layers + ITM head (fusion.py)
        fusion_heads=4,
        fusion_width=0,          # 0: the text tower's width
    ))
    c.peft = ml_collections.ConfigDict(dict(
        recipe="full",           # peft.RECIPES
        overrides=(),            # ("<regex>=trainable|frozen", ...) over the recipe
    ))
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, warmup_init_lr=1e-5, end_lr=1e-5, warmup_steps=1000,
        warmup_fraction=0.0,     # > 0: the warm-up lasts this fraction of the run instead
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.02, grad_clip_norm=0.0,
    ))
    return c


def demo(c: ml_collections.ConfigDict, steps: int, batch_size: int = 64,
         lr: float = 1e-3) -> ml_collections.ConfigDict:
    """The `demo` modifier's shared part: embedded synthetic data, a short run, frequent
    evaluation. Each recipe picks its tiny towers itself."""
    c.data.train = c.data.eval = c.eval.zeroshot = "synthetic:shapes"
    c.data.num_train, c.data.num_eval = 20_000, 512
    c.batch_size = batch_size
    c.total_steps = steps
    c.log_every = 50
    c.eval_every = c.checkpoint_every = max(steps // 4, 1)
    c.eval.batch_size = 256
    c.optim.lr, c.optim.warmup_init_lr, c.optim.end_lr = lr, lr / 10, lr / 10
    c.optim.warmup_steps = max(steps // 10, 1)
    return c


def demo_towers(c: ml_collections.ConfigDict, image: str = "clip_tiny_vision",
                text: str = "clip_tiny_text", projection_dim: int = 64, **fields):
    """Tiny towers without checkpoints (32 px images, 16-token captions)."""
    image_fields = {k[6:]: v for k, v in fields.items() if k.startswith("image_")}
    text_fields = {k[5:]: v for k, v in fields.items() if k.startswith("text_")}
    c.model.image = tower(image, **{"image_size": 32, **image_fields})
    c.model.text = tower(text, **{"max_length": 16, **text_fields})
    c.model.projection_dim = projection_dim
    return c
