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

Everything else such a run evaluates on (zero-shot images and class prompts, few-shot and
compositional sets) goes through the frozen towers once too: `TowerFeatures` computes those
features when the evaluators are built and caches them in `sets/` beside `train/` and `eval/`.
"""

from __future__ import annotations

from pathlib import Path

from absl import logging

from valign_jax import build, sharding
from valign_jax.batched import FeatureEncoder, eval_batch_size, text_inputs
from valign_jax.data import feature_cache, feature_sets, pipeline
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
        written.append(feature_cache.cache_features(  # decoded, eval-transformed records
            model, params, pipeline.DecodedView(source), collate,
            cache_dir(config, split, workdir),
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


# ---------------------------------------------------------------------------------------------
# Evaluation data beyond the eval split: zero-shot, few-shot, compositional sets


class TowerFeatures:
    """The frozen towers' pooled outputs of evaluation images and texts, for the evaluators of
    a towerless model (evaluation/inputs.py). Computed once per set and cached under
    `<feature_cache>/sets/` (data/feature_sets.py) with the training cache's manifest keys; the
    towers are built only when a set is not on disk yet, and `release` drops their weights."""

    def __init__(self, config, workdir=None, mesh=None):
        self.config, self.mesh, self.workdir = config, mesh, workdir
        self.directory = cache_dir(config, "sets", workdir)
        tower_keys = manifest(config, "eval")
        for key in ("source", "seed", "num_examples"):  # what the eval split is, not the towers
            tower_keys.pop(key, None)
        self.tower_keys = tower_keys
        self.model = build_model(config)
        self.image_size = image_size(config, self.model)
        self._towers = None

    def _load(self):
        """(encoder, params, collate) of the full model: towers from their checkpoints or from
        the seed, as the training cache was made."""
        if self._towers is None:
            mesh = self.mesh or sharding.make_mesh(self.config.mesh.data, self.config.mesh.fsdp)
            param_sh = sharding.tree_shardings(abstract_params(self.model), mesh,
                                               self.config.mesh.min_fsdp_size)
            params = initial_params(self.config, self.model, param_sh)
            _, collate = input_setup(self.config, self.model, workdir=self.workdir)
            encoder = FeatureEncoder(self.model, mesh, param_sh,
                                     eval_batch_size(self.config.eval.batch_size, mesh))
            self._towers = (encoder, params, collate)
        return self._towers

    def images(self, pixels):
        """Image tower features of uint8 (N, H, W, 3) pixels."""
        digest = feature_sets.pixels_digest(pixels)

        def compute():
            encoder, params, collate = self._load()
            return encoder.run(feature_cache.image_features, params, {"pixel_values": pixels},
                               lambda x: pipeline.normalize(x, collate.mean, collate.std),
                               "tower features of evaluation images")
        return feature_sets.cached_features(
            self.directory / f"images-{digest[:16]}",
            {**self.tower_keys, "kind": "images", "sha256": digest, "count": len(pixels)},
            compute)

    def texts(self, texts):
        """Text tower features of caption strings."""
        digest = feature_sets.texts_digest(texts)

        def compute():
            encoder, params, collate = self._load()
            return encoder.run(feature_cache.text_features, params,
                               text_inputs(collate.tokenizer(list(texts))), None,
                               "tower features of evaluation texts")
        return feature_sets.cached_features(
            self.directory / f"texts-{digest[:16]}",
            {**self.tower_keys, "kind": "texts", "sha256": digest, "count": len(texts)},
            compute)

    def release(self) -> None:
        self._towers = None


def with_towers(config, head_params, mesh=None):
    """(full model, its parameters, config) of a run that trained from cached features: the
    towers as the cache was made (their checkpoints, or the seed) and the run's trained heads.
    The config no longer names the feature cache, so evaluators run the towers end to end —
    what `python -m valign_jax.evaluate --towers` checks the cached numbers against."""
    import jax
    from valign_jax.models.layout import overlay
    model = build_model(config)
    mesh = mesh or sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    param_sh = sharding.tree_shardings(abstract_params(model), mesh, config.mesh.min_fsdp_size)
    towers = jax.device_get(initial_params(config, model, param_sh))
    params = overlay(towers, head_params, "the run's checkpoint")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.feature_cache = ""
    return model, params, config
