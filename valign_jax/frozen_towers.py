"""Training from frozen towers' cached features (SAIL): where a config's cache lives, what it
depends on, building it (`--mode=cache_features` runs the frozen towers once over the training
and evaluation data and stores their pooled outputs), and the towerless model that trains from
it, reading features from disk and never running the towers. The cache's format is
data/feature_cache.py's.

    python -m valign_jax.main --config=configs/sail.py:demo --mode=cache_features
    python -m valign_jax.main --config=configs/sail.py:demo --workdir=DIR   # trains from it

The cache lives in `config.data.feature_cache` (`train/` and `eval/` inside; a relative path is
inside the run's workdir). A training run whose cache is missing or unfinished builds it first,
so one command does both; `--mode=cache_features` builds it alone. Its manifest
records what produced it — checkpoints, presets, pooling, dtype, image size, caption length,
data source — and a training run whose config disagrees is refused with the difference named.
"""

from __future__ import annotations

from pathlib import Path

from absl import logging

from valign_jax import build, sharding
from valign_jax.data import feature_cache, pipeline
from valign_jax.models.layout import abstract_params
from valign_jax.run_setup import build_model, image_size, initial_params, input_setup

SPLITS = ("train", "eval")


def cache_dir(config, split: str, workdir=None) -> Path:
    path = Path(config.data.feature_cache)
    if not path.is_absolute():
        if workdir and "://" in str(workdir):  # the cache is memory-mapped: it must be local
            raise ValueError(f"config.data.feature_cache={str(path)!r} is relative to the "
                             f"workdir {workdir}, a URL; feature caches are memory-mapped "
                             f"files: give an absolute local path")
        path = Path(workdir or ".").absolute() / path
    return path / split


def manifest(config, split: str) -> dict:
    """What the cached features of `split` depend on."""
    image, text = config.model.image, config.model.text
    spec, count = pipeline.split_spec(config.data, split)
    mean, std = pipeline.normalization(image, config.data)
    out = {"image_checkpoint": image.checkpoint, "image_preset": image.preset,
           "image_pooling": image.pooling, "image_size": image.image_size,
           "text_checkpoint": text.checkpoint, "text_preset": text.preset,
           "text_pooling": text.pooling, "max_length": text.max_length,
           "lower_case": config.data.lower_case, "dtype": config.model.dtype,
           "image_mean": list(mean), "image_std": list(std),
           "source": spec}
    if spec.startswith("synthetic:"):  # the embedded data is a function of these
        out.update(seed=config.data.seed, num_examples=count)
    return out


def cache_all(config, workdir=None) -> list[Path]:
    """Run the towers over data.train and data.eval into the cache; resumes a partial cache."""
    if not config.data.get("feature_cache"):
        raise ValueError("--mode=cache_features needs config.data.feature_cache: the directory "
                         "the features go to")
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    model = build_model(config)
    param_sh = sharding.tree_shardings(abstract_params(model), mesh, config.mesh.min_fsdp_size)
    params = initial_params(config, model, param_sh)
    # The checkpoint's own pixel statistics when it has them, as a raw training run uses.
    sources = {split: pipeline.make_source(pipeline.split_spec(config.data, split)[0], split,
                                           config.data, image_size(config, model),
                                           f"config.data.{split}")
               for split in SPLITS}
    _, collate = input_setup(config, model, workdir=workdir, train_source=sources["train"])
    written = []
    for split, source in sources.items():
        spec = pipeline.split_spec(config.data, split)[0]
        logging.info("caching %s features of %s (%d examples)", split, spec, len(source))
        written.append(feature_cache.cache_features(
            model, params, source, collate, cache_dir(config, split, workdir),
            manifest(config, split),
            mesh=mesh, batch_size=config.eval.batch_size))
    return written


def cached_model(config, workdir=None):
    """The DualEncoder that trains from the cache: FeaturesConfig towers, the config's heads.
    Builds a missing or unfinished cache; refuses one made under a different config."""
    try:
        for split in SPLITS:
            feature_cache.check_manifest(cache_dir(config, split, workdir),
                                         manifest(config, split))
    except FileNotFoundError as err:
        logging.info("building the feature cache (%s)", err)
        cache_all(config, workdir)
    image_cfg, text_cfg = feature_cache.feature_configs(cache_dir(config, "train", workdir))
    return build.build_dual_encoder(config.model, towers=(image_cfg, text_cfg))
