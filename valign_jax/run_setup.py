"""What a run starts from: the model its config describes, the parameters it starts with (fresh,
tower checkpoints, a CLIP checkpoint or a previous run), and how records become model inputs.

Training, `evaluate` and the feature cache all start here, so they agree on all three.
"""

from __future__ import annotations

import contextlib

import jax
from absl import logging

from valign_jax import build, checkpointing, sharding, storage
from valign_jax.models import FeaturesConfig, registry
from valign_jax.models.layout import overlay


def check_text_length(max_length: int, text_config) -> None:
    """A text tower trained on captions padded to its full length (SigLIP pools the last
    position) must get exactly that length: other padding changes its embeddings."""
    if isinstance(text_config, FeaturesConfig):
        return
    family = registry.family_of(text_config)
    positions = getattr(text_config, "max_position_embeddings", None)
    if family.pads_to_max_positions and max_length != positions:
        raise ValueError(
            f"config.model.text.max_length={max_length}, but a {family.name} tower pads every "
            f"caption to its max_position_embeddings={positions} (it pools the last position "
            f"and was trained so; other padding changes its embeddings): set "
            f"config.model.text.max_length={positions}")


@contextlib.contextmanager
def checkpoint_errors(config):
    """Turn an unreachable checkpoint into an error that says what to do offline."""
    try:
        yield
    except FileNotFoundError as err:
        named = [c for c in (config.model.image.checkpoint, config.model.text.checkpoint,
                             config.model.init_from) if c]
        raise FileNotFoundError(
            f"{err}\nThis config names checkpoints {named}. Without network access to the "
            f"Hugging Face hub, run the recipe's ':demo' variant (tiny towers, embedded data, "
            f"offline), or point config.model.image.checkpoint / config.model.text.checkpoint "
            f"(or config.model.init_from) at local directories.") from err


def build_model(config):
    with checkpoint_errors(config):
        return build.build_dual_encoder(config.model)


def initial_params(config, model, param_sh):
    """Fresh parameters, overlaid with pretrained weights: the tower checkpoints, or everything
    from `config.model.init_from` (a full CLIP checkpoint or a previous run's workdir)."""
    init = jax.jit(lambda rng: model.init(rng, **model.dummy_inputs())["params"],
                   out_shardings=param_sh)
    params = init(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
    with checkpoint_errors(config):
        source = config.model.init_from
        if source and (storage.path(source) / checkpointing.MODEL_JSON).is_file():
            pretrained, step = checkpointing.restore_params(source)
            logging.info("initialising from %s (step %d)", source, step)
        elif source:
            from valign_jax import hf
            _, pretrained = hf.load_dual_encoder(source, dtype=config.model.dtype,
                                                 scan_layers=config.model.scan_layers)
        elif isinstance(model.image_config, FeaturesConfig):
            pretrained = {}  # trains from cached features: the model has no towers to load
        else:
            pretrained = build.pretrained_towers(config.model)
    if not pretrained:
        return params
    merged = overlay(jax.device_get(params), pretrained)
    return sharding.put(merged, param_sh)


def input_setup(config, model, second_caption: bool = False):
    """(image size, Collate): how records become model inputs, for training and evaluation.
    second_caption: batches also carry each image's second caption (an objective needs it)."""
    from valign_jax.data import pipeline
    check_text_length(config.model.text.max_length, model.text_config)
    image_size = config.model.image.image_size or getattr(model.image_config, "image_size", 0)
    tokenizer = pipeline.make_tokenizer(config.model.text, config.data.lower_case)
    mean, std = pipeline.normalization(config.model.image, config.data)
    return image_size, pipeline.Collate(tokenizer, mean, std, multi_positive=second_caption)
