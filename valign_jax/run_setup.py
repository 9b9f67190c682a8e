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


def input_setup(config, model, second_caption: bool = False, workdir=None, train_source=None,
                labels: bool = False):
    """(image size, Collate): how records become model inputs, for training and evaluation.
    second_caption: batches also carry each image's second caption (an objective needs it);
    labels: each record's class label (an objective that classifies needs it).
    workdir / train_source: where a learned vocabulary is kept, and the captions it is learned
    from when it is not there yet (tokenizer_for)."""
    from valign_jax.data import pipeline
    check_text_length(config.model.text.max_length, model.text_config)
    tokenizer = tokenizer_for(config, workdir, train_source)
    mean, std = pipeline.normalization(config.model.image, config.data)
    return image_size(config, model), pipeline.Collate(tokenizer, mean, std,
                                                      multi_positive=second_caption,
                                                      labels=labels)


def image_size(config, model) -> int:
    """The side images are made for: the config's, else the image tower's own."""
    return config.model.image.image_size or getattr(model.image_config, "image_size", 0)


def tokenizer_kind(config) -> str:
    """"checkpoint" (the text tower's own), "words", "learned" or "directory"
    (config.data.tokenizer names one)."""
    if config.model.text.checkpoint:
        return "checkpoint"
    choice = config.data.get("tokenizer", "auto")
    if choice == "auto":
        return "words" if config.data.train.startswith("synthetic:") else "learned"
    return choice if choice in ("words", "learned") else "directory"


def tokenizer_for(config, workdir=None, train_source=None):
    """The text tower's tokenizer: its checkpoint's; for a tower trained from scratch the
    embedded data's word list, a vocabulary learned from the training captions (kept in
    <workdir>/tokenizer, so a resumed run, `evaluate` and `load_trained` read the same one),
    or the tokenizer files config.data.tokenizer names."""
    from valign_jax.data import synthetic, tokenizer
    text, lower = config.model.text, config.data.lower_case
    kind = tokenizer_kind(config)
    if kind == "checkpoint":
        return tokenizer.Tokenizer(text.checkpoint, text.max_length, lower)
    if kind == "directory":
        return tokenizer.Tokenizer(config.data.tokenizer, text.max_length, lower)
    if kind == "words":
        return synthetic.WordTokenizer(text.max_length)
    if workdir is None:
        raise ValueError("config.data.tokenizer resolves to 'learned': its vocabulary lives in "
                         "the run's workdir, which this call was not given")
    directory = storage.path(workdir) / tokenizer.LEARNED_DIR
    if not (directory / "tokenizer.json").is_file():
        if train_source is None:
            raise FileNotFoundError(f"{directory} holds no learned tokenizer: the run that "
                                    f"trained this model did not finish its start")
        vocab_size = build.tower_config(text, config.model, "text", False).vocab_size
        captions = tokenizer.caption_texts(train_source)
        logging.info("learning a %d-token vocabulary from %d training captions into %s",
                     vocab_size, len(captions), directory)
        if jax.process_index() == 0:
            tokenizer.learn_tokenizer(captions, vocab_size, directory, lower_case=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("learned tokenizer written")
    return tokenizer.Tokenizer(directory, text.max_length, lower)


UNKNOWN_WARNING = 0.02  # share of caption tokens that become [UNK] worth a warning


def report_unknown_tokens(collate, source, sample: int = 2000) -> float:
    """Log the share of the training captions' tokens the tokenizer does not know, and warn,
    naming words, when it is large: those words never reach the text tower."""
    from valign_jax.data import tokenizer
    captions = tokenizer.caption_texts(source, sample)
    if not captions:
        return 0.0
    share, lost = tokenizer.unknown_words(collate.tokenizer, captions)
    logging.info("tokenizer: %.1f%% of the training captions' tokens are unknown to it",
                 100 * share)
    if share > UNKNOWN_WARNING:
        logging.warning("%.0f%% of the caption tokens become [UNK], e.g. the words %s: the text "
                        "tower cannot tell them apart. Use a vocabulary that has them: "
                        "config.data.tokenizer='learned' (from your captions) or a text tower "
                        "with a checkpoint and its tokenizer", 100 * share, lost[:8])
    return share
