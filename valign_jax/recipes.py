"""What recipe files (configs/*.py) build on, and how a config string becomes a config.

A recipe file defines `get_config(arg)`; `arg` is what follows the colon in
`--config=configs/lilt.py:lilt_lwa,demo`: comma-separated tokens, at most one variant name plus
modifiers (`demo`: tiny towers on the embedded synthetic data, offline).

    from valign_jax import recipes
    def get_config(arg=None):
        variant, modifiers = recipes.parse_arg(arg, VARIANTS, "default", "configs/mine.py")
        c = recipes.base_config()          # every key at its default (valign_jax/schema.py)
        ...
        if "demo" in modifiers:
            recipes.demo_towers(c)
            recipes.demo(c, steps=500)
        return c
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from valign_jax.schema import base_config, eval_entry, tower  # noqa: F401  (for recipe files)

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


def load_config(spec: str | Path):
    """A config from a string like 'configs/clip.py:demo' (the path relative to the working
    directory, or absolute)."""
    path, _, arg = str(spec).partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} (from {str(spec)!r}) does not exist")
    module_spec = importlib.util.spec_from_file_location(f"valign_recipe_{Path(path).stem}",
                                                         path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


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
