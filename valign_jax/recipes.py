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
import os
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


PRETRAINED_TOWERS_ENV = "VALIGN_JAX_PRETRAINED_TOWERS"


def pretrained_towers_dir() -> Path:
    """Where the miniature's pretrained tiny towers live (`image/` and `text/`, Hugging Face
    directories): $VALIGN_JAX_PRETRAINED_TOWERS, else ~/.cache/valign_jax/pretrained_towers.
    `python -m papers.run pretrain` trains them there (configs/pretrain.py)."""
    return Path(os.environ.get(PRETRAINED_TOWERS_ENV)
                or Path.home() / ".cache" / "valign_jax" / "pretrained_towers").expanduser()


def pretrained_demo_towers(c: ml_collections.ConfigDict, directory=None):
    """The `pretrained` modifier: both towers load the pretrained tiny towers (their
    architecture from each directory's config.json; the recipe keeps its pooling, adapters and
    fresh heads; the text tower's tokenizer is the one saved with it). FileNotFoundError naming
    the command that makes them when they are not there."""
    root = Path(directory or pretrained_towers_dir())
    for side in ("image", "text"):
        path = root / side
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the `pretrained` modifier starts from the tiny towers that `python -m "
                f"papers.run pretrain` trains on the embedded data (a few minutes on a CPU), "
                f"but {path} holds none. Run that first (it writes to {root}; "
                f"${PRETRAINED_TOWERS_ENV} or --towers=DIR choose another place), or drop "
                f"`pretrained` to align random towers.")
        c.model[side].checkpoint = str(path)
    return c


DEMO_CHECKPOINTS = {  # kind: (image preset, text preset) of the tiny random checkpoints
    "siglip": ("siglip_tiny_vision", "siglip_tiny_text"),
    "siglip2": ("siglip2_tiny_naflex_vision", "siglip2_tiny_text"),
}


def demo_checkpoint(kind: str = "siglip", seed: int = 0) -> str:
    """A tiny randomly initialised Hugging Face checkpoint of a two-tower `kind` (SiglipModel
    or Siglip2Model layout, 32-px images, 16-token captions) with the synthetic data's
    vocabulary as its tokenizer: what `:demo` variants that start from a checkpoint fine-tune,
    offline. Written once (the same bytes for the same seed) under $VALIGN_JAX_DEMO_DIR or
    ~/.cache/valign_jax/demo_checkpoints, and its directory returned."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    import jax

    from valign_jax import hf
    from valign_jax.data import synthetic
    from valign_jax.models import registry
    from valign_jax.models.dual_encoder import DualEncoder

    if kind not in DEMO_CHECKPOINTS:
        raise ValueError(f"demo_checkpoint({kind!r}): known kinds {sorted(DEMO_CHECKPOINTS)}")
    root = Path(os.environ.get("VALIGN_JAX_DEMO_DIR")
                or Path.home() / ".cache" / "valign_jax" / "demo_checkpoints")
    target = root / f"{kind}_tiny_seed{seed}"
    if (target / "config.json").is_file():
        return str(target)
    image_preset, text_preset = DEMO_CHECKPOINTS[kind]
    image = registry.preset(image_preset)
    text = registry.preset(text_preset)
    if text.vocab_size < synthetic.WordTokenizer(16).vocab_size:
        raise ValueError(f"{text_preset}: its vocabulary is smaller than the synthetic data's")
    kind_spec = registry.dual_checkpoint(kind)
    model = DualEncoder(image, text, image_head=kind_spec.heads, text_head=kind_spec.heads,
                        **kind_spec.settings({}, image, text))
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), **model.dummy_inputs())["params"]
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:  # written aside, then renamed: concurrent runs never see half a checkpoint
        hf.save_dual_encoder(model, params, staging, formats=("safetensors",))
        synthetic.save_hf_tokenizer(staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
