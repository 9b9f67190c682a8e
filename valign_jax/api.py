"""The Python API: one function per step of what a notebook or a script does with valign_jax.

    import valign_jax

    clip = valign_jax.load("openai/clip-vit-base-patch32")      # or a training run's workdir
    data = valign_jax.load_images("synthetic:shapes", clip.image_size, limit=64)
    result = valign_jax.zero_shot(clip, data)                   # prompts: the data's templates
    print(result.metrics["top1"], data.class_names[result.predicted[0]])
    valign_jax.plot_predictions(data, result)                   # images with their labels

    recipe = valign_jax.recipe("configs/clip.py:demo", {"total_steps": 100})
    print(recipe.command("/tmp/run"))                           # the same run from a shell
    metrics = valign_jax.train.train_and_evaluate(recipe.config, "/tmp/run")
    report = valign_jax.evaluate.evaluate(workdir="/tmp/run")   # metrics, PCA and LN-shift plots
    valign_jax.plot_metrics("/tmp/run")                         # the logged curves

Each function runs the code the command lines run: a workdir is read as `evaluate` reads it
(run_setup: the model, its tokenizer, its pixel statistics), images come from the same sources
through the same eval transform as a run's evaluation data, and zero-shot goes through the
evaluators' batched.FeatureEncoder and evaluation.zeroshot. So the accuracy `zero_shot` gives
for a run's checkpoint on its own held-out images is the one the run logged.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# A model


@dataclasses.dataclass
class LoadedModel:
    """A dual encoder ready to embed images and texts: what `load` returns.

    model, params: the Flax DualEncoder and its parameters (host arrays); tokenizer: a list of
    texts -> {"input_ids", "attention_mask"} at the text tower's length; mean, std: the pixel
    statistics images are normalised with; image_size: the side (pixels) images must have;
    config: the run's config (for an HF checkpoint, the defaults pointed at it); source: what
    was loaded; step: the checkpoint's step (None for an HF checkpoint); batch_size: examples
    per model call (every call is padded to it, so each method compiles once).
    """

    model: Any
    params: Any
    tokenizer: Any
    mean: tuple
    std: tuple
    image_size: int
    config: Any
    source: str
    step: int | None
    batch_size: int
    _placed: Any = dataclasses.field(default=None, init=False, repr=False)

    def encoder(self):
        """(batched.FeatureEncoder, the parameters placed on the devices), made on first use:
        every local device takes a slice of each batch."""
        if self._placed is None:
            from valign_jax import sharding
            from valign_jax.batched import FeatureEncoder, eval_batch_size
            mesh = sharding.make_mesh()
            param_sh = sharding.tree_shardings(self.params, mesh)
            encoder = FeatureEncoder(self.model, mesh, param_sh,
                                     eval_batch_size(self.batch_size, mesh))
            self._placed = (encoder, sharding.put(self.params, param_sh))
        return self._placed

    def encode_images(self, images) -> np.ndarray:
        """Image features (N, D), float32, as the model projects them (not normalised).
        images: uint8 (N, image_size, image_size, 3), e.g. `load_images(...).images`."""
        from valign_jax.data.pipeline import normalize
        images = np.asarray(images)
        side = self.image_size
        if images.ndim != 4 or images.shape[1:] != (side, side, 3) or not len(images):
            raise ValueError(f"images: expected (N, {side}, {side}, 3) pixels, got shape "
                             f"{images.shape}; load_images(spec, image_size={side}) makes "
                             f"them this size")
        encoder, params = self.encoder()
        return encoder.images(params, images, lambda x: normalize(x, self.mean, self.std))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text features (N, D), float32, as the model projects them (not normalised)."""
        if isinstance(texts, str) or not len(texts):
            raise ValueError(f"texts: expected a non-empty list of strings, got {texts!r:.80}")
        encoder, params = self.encoder()
        return encoder.texts(params, self.tokenizer(list(texts)))

    def __str__(self) -> str:
        what = f"step {self.step} of {self.source}" if self.step is not None else self.source
        return (f"{what}: {type(self.model.image_config).__name__} + "
                f"{type(self.model.text_config).__name__}, {self.image_size} px images, "
                f"pixel mean {_rounded(self.mean)} std {_rounded(self.std)}, texts of "
                f"{getattr(self.tokenizer, 'max_length', '?')} tokens")


def load(model: str, step: int | None = None, batch_size: int | None = None) -> LoadedModel:
    """A model with what it needs to read images and texts: a training workdir (its checkpoint
    `step`, the latest by default, with the run's tokenizer and pixel statistics), or a
    Hugging Face two-tower checkpoint that hf.load_dual_encoder reads (CLIP, SigLIP; a hub id
    or a local directory), with its own tokenizer (texts padded to its position table) and its
    preprocessor_config.json's pixel statistics ([-1, 1] pixels without one).

        clip = valign_jax.load("openai/clip-vit-base-patch32")
        run = valign_jax.load("/tmp/clip_demo")
        features = run.encode_texts(["a photo of a red circle."])

    batch_size: examples per model call (default: the run's config.eval.batch_size, so its
    figures are the run's own; 256 for an HF checkpoint).
    """
    import jax

    from valign_jax import checkpointing, storage
    from valign_jax.run_setup import image_size, input_setup

    name = str(model)
    if (storage.path(name) / checkpointing.MODEL_JSON).is_file():
        from valign_jax.models import FeaturesConfig
        from valign_jax.workdir import load_run
        net, params, step, config = load_run(name, step)
        if isinstance(net.image_config, FeaturesConfig):
            raise ValueError(f"{name} trained from cached tower features: its model takes "
                             f"features, not images. Evaluate it with python -m "
                             f"valign_jax.evaluate --workdir={name}")
        _, collate = input_setup(config, net, workdir=name)  # its learned vocabulary, if any
        side = image_size(config, net)
    else:
        if step is not None:
            raise ValueError(f"step={step}: {name} is not a training workdir (it has no "
                             f"{checkpointing.MODEL_JSON}); a Hugging Face checkpoint has no "
                             f"steps")
        _check_hf_location(name)
        net, params, config = _from_hf(name)
        _, collate = input_setup(config, net)
        side = config.model.image.image_size
    return LoadedModel(net, jax.device_get(params), collate.tokenizer, tuple(collate.mean),
                       tuple(collate.std), int(side), config, name, step,
                       int(batch_size or config.eval.batch_size))


def _check_hf_location(name: str) -> None:
    """A local path that is neither a workdir nor an HF checkpoint, named as such."""
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name}: neither a training workdir (it has no model.json) nor a Hugging Face "
            f"checkpoint directory (no config.json); pass a run's --workdir, a checkpoint "
            f"directory or a hub id such as openai/clip-vit-base-patch32")


def _from_hf(path: str):
    """(model, params, config) of an HF dual encoder; the config is the schema's defaults with
    both towers' checkpoint set to it, so run_setup reads its tokenizer and pixel statistics
    exactly as `evaluate --hf` does."""
    from valign_jax import hf, schema
    net, params = hf.load_dual_encoder(path)
    config = schema.base_config()
    config.model.image.checkpoint = config.model.text.checkpoint = path
    config.model.image.image_size = int(net.image_config.image_size)
    length = getattr(net.text_config, "max_position_embeddings", None)
    if length:  # the longest text the checkpoint reads; else the schema's default
        config.model.text.max_length = int(length)
    return net, params, config


def _rounded(values) -> tuple:
    return tuple(round(float(v), 4) for v in values)


# ---------------------------------------------------------------------------------------------
# Images


@dataclasses.dataclass
class ImageSet:
    """Labelled images as a model reads them: what `load_images` returns.

    images: uint8 (N, S, S, 3), resized and centre-cropped; labels: (N,) class indices into
    class_names; source: the data string they came from (it chooses the "auto" templates);
    skipped: broken files left out (counted, never silently).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def __str__(self) -> str:
        shown = ", ".join(self.class_names[:4]) + (", ..." if len(self.class_names) > 4 else "")
        skipped = f"; {self.skipped} broken files skipped" if self.skipped else ""
        return (f"{len(self)} images of {self.images.shape[1]} px from {self.source}, "
                f"{len(self.class_names)} classes ({shown}){skipped}")


def load_images(spec: str, image_size, limit: int | None = None, *,
                class_names: Sequence[str] | str | None = None, seed: int = 0) -> ImageSet:
    """Labelled images from a data string, as a run's evaluation reads them: `synthetic:shapes`
    (the embedded shapes, drawn at any size: the held-out split), a folder of class folders
    (`<root>/<class name>/<images>`; the folder names are the class names), or
    `tfds:<name>/<split>` (a prepared TensorFlow Datasets classification set). Each image is
    resized and centre-cropped to `image_size` (an int, or a loaded model: its image size).

        data = valign_jax.load_images("/data/pets", clip.image_size, limit=200)
        data.images, data.labels, data.class_names

    limit: at most this many images (default: all; for the synthetic shapes 512). From a
    larger folder or tfds set they are a random sample (seeded by `seed`), so every class can
    appear; the synthetic split is drawn with `seed` and holds exactly `limit` images, as a
    run with config.data.num_eval = limit evaluates on.
    class_names: names to write into the prompts instead of the data's own (a list, or a text
    file with one per line, in the classes' order; tfds ImageNet's WordNet ids need them).
    """
    import ml_collections

    from valign_jax import schema
    from valign_jax.data import pipeline
    from valign_jax.evaluation.build import dataset_class_names, open_eval_source, read_class_names

    size = int(getattr(image_size, "image_size", image_size))
    if limit is not None and (int(limit) != limit or limit < 1):
        raise ValueError(f"limit={limit!r}: expected a positive number of images, or None "
                         f"for all")
    count = int(limit or schema.SCHEMA["data.num_eval"].default)  # synthetic: drawn to order
    data = ml_collections.ConfigDict({"num_train": count, "num_eval": count, "seed": seed})
    source = open_eval_source(str(spec), ml_collections.ConfigDict({"data": data}), size,
                              "spec")
    if class_names is None:
        names = dataset_class_names(source)
    elif isinstance(class_names, (str, Path)):
        if not Path(class_names).expanduser().is_file():
            raise FileNotFoundError(f"class_names: {class_names} does not exist (a text file "
                                    f"with one class name per line)")
        names = read_class_names(Path(class_names).expanduser())
    else:
        names = tuple(str(n) for n in class_names)
    own = pipeline.class_names(source)
    if len(names) != len(own):
        raise ValueError(f"class_names: {len(names)} names, but {spec} has {len(own)} classes "
                         f"({', '.join(own[:4])}, ...)")
    if limit and not str(spec).startswith("synthetic:") and limit < len(source):
        source = _Sample(source, np.random.default_rng(seed).permutation(len(source)))
    read = pipeline.eval_records(source, limit=limit)
    return ImageSet(np.stack([r["image"] for r in read.records]),
                    np.asarray([r["label"] for r in read.records], np.int64), tuple(names),
                    str(spec), read.skipped)


class _Sample:
    """A source's records in another order (a seeded permutation): the first `limit` good ones
    are then a random sample rather than the first classes of a sorted folder."""

    def __init__(self, source, order):
        self.source, self.order = source, order
        self.name, self.class_names = source.name, source.class_names
        self.eval_transform = source.eval_transform

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index) -> dict:
        return self.source[int(self.order[index])]

    def describe(self, index) -> str:
        return self.source.describe(int(self.order[index]))


# ---------------------------------------------------------------------------------------------
# Zero-shot classification


@dataclasses.dataclass
class ZeroShotResult:
    """What `zero_shot` returns. probs: (N, C) class probabilities, the softmax over classes
    of the model's logits (its logit scale times the cosine similarity to each class
    embedding, plus its logit bias if it has one; a sigmoid-trained model such as SigLIP
    scores each class on its own as sigmoid(logits), which ranks the classes the same);
    predicted: (N,) the most similar class;
    metrics: top-1 / top-5 accuracy and the mean per-class recall, as the zero-shot evaluator
    reports them (empty without labels); templates: the prompts each class name was written
    into; image_features (N, D) / class_features (C, D, unit rows): what was compared."""

    probs: np.ndarray
    predicted: np.ndarray
    logits: np.ndarray
    metrics: dict
    class_names: tuple
    templates: tuple
    labels: np.ndarray | None
    image_features: np.ndarray
    class_features: np.ndarray

    def __str__(self) -> str:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
        return (f"{len(self.probs)} images, {len(self.class_names)} classes, "
                f"{len(self.templates)} templates: {scores or 'no labels, no accuracy'}")


def zero_shot(model: LoadedModel, images, class_names: Sequence[str] | None = None,
              labels=None, templates="auto") -> ZeroShotResult:
    """Classify images without training a classifier: each class name is written into the
    prompt templates ("a photo of a {}."), the prompts are embedded and averaged per class
    (CLIP's prompt ensemble), and each image gets the class whose embedding is closest.

        data = valign_jax.load_images("synthetic:shapes", clip.image_size, limit=64)
        result = valign_jax.zero_shot(clip, data)
        result.metrics["top1"], result.probs[0], data.class_names[result.predicted[0]]

    images: an ImageSet (its class names, labels and source come with it), or uint8 pixels
    (N, S, S, 3) with `class_names` (and `labels` for an accuracy).
    templates: "auto" (the synthetic data's own templates; SVHN: "a photo of the number {}";
    else CLIP's 80), "single", "clip7", "clip80", or a list of strings each with one "{}".
    The images and prompts go through the zero-shot evaluator's code (batched.FeatureEncoder,
    evaluation.zeroshot), so `metrics` equals what a run logs for the same images.
    """
    from valign_jax.evaluation import zeroshot
    from valign_jax.evaluation.geometry import l2_normalize
    from valign_jax.evaluation.templates import templates_for

    if isinstance(images, ImageSet):
        class_names = images.class_names if class_names is None else class_names
        labels = images.labels if labels is None else labels
        dataset, pixels = images.source, images.images
    else:
        dataset, pixels = "", np.asarray(images)
    if class_names is None or isinstance(class_names, str) or not len(class_names):
        raise ValueError("class_names: give the list of class names (or pass an ImageSet from "
                         "load_images, which carries them)")
    names = tuple(str(n) for n in class_names)
    chosen = templates_for(templates, dataset, key="templates")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(pixels),):
            raise ValueError(f"labels: expected {len(pixels)} class indices (one per image), "
                             f"got shape {labels.shape}")

    image_features = model.encode_images(pixels)
    encoder, params = model.encoder()
    prompts = [t.format(name) for name in names for t in chosen]  # class-major, as evaluated
    class_features = zeroshot.class_embeddings(
        encoder.texts(params, model.tokenizer(prompts)), len(names), len(chosen))

    # Cosine similarities computed as zeroshot_metrics computes them, so `predicted` is the
    # class its top-1 counts.
    similarity = (l2_normalize(image_features, "image features")
                  @ l2_normalize(class_features, "class features").T)
    logits = np.exp(float(model.params["logit_scale"])) * similarity
    if "logit_bias" in model.params:
        logits = logits + float(model.params["logit_bias"])
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    metrics = {} if labels is None else zeroshot.zeroshot_metrics(image_features,
                                                                  class_features, labels)
    return ZeroShotResult(probs, similarity.argmax(axis=1), logits, metrics, names, chosen,
                          labels, image_features, class_features)


# ---------------------------------------------------------------------------------------------
# Recipes


@dataclasses.dataclass
class Recipe:
    """A recipe's config with changes, and the command line that makes the same config:
    what `recipe` returns. spec: the recipe as given ("configs/clip.py:demo"); config: the
    ml_collections ConfigDict to train with; flags: the `--config.<key>=<value>` flags of the
    changes."""

    spec: str
    config: Any
    flags: list

    def command(self, workdir) -> str:
        """`python -m valign_jax.main ...` that trains this config into `workdir`."""
        return shlex.join(["python", "-m", "valign_jax.main", f"--config={self.spec}",
                           f"--workdir={workdir}", *self.flags])

    def __str__(self) -> str:
        c = self.config
        towers = [c.model[side].preset or c.model[side].checkpoint for side in ("image", "text")]
        steps = c.total_steps or f"{c.num_epochs} epochs"
        return "\n".join([
            f"{self.spec}{' with ' + ' '.join(self.flags) if self.flags else ''}",
            f"  data: train {c.data.train}, eval {c.data.eval}, zero-shot "
            f"{c.eval.zeroshot or '-'}",
            f"  towers: {towers[0]} + {towers[1]}; objective {c.objective.kind}; "
            f"batch {c.batch_size}; steps {steps}"])


def recipe(spec: str, overrides: Mapping[str, Any] | None = None, **keys) -> Recipe:
    """A recipe file's config (`configs/<recipe>.py:<argument>`, found relative to the working
    directory or to the repository, as `--config=` finds it) with some keys changed: dotted
    names in `overrides`, top-level ones also as keywords. A None value keeps the recipe's own.

        demo = valign_jax.recipe("configs/clip.py:demo", {"data.num_eval": 128}, total_steps=100)
        demo.config.total_steps          # 100
        demo.command("/tmp/run")         # python -m valign_jax.main --config=configs/clip.py:demo
                                         #   --workdir=/tmp/run --config.data.num_eval=128 ...
        valign_jax.train.train_and_evaluate(demo.config, "/tmp/run")

    An unknown key is a KeyError naming the keys that level has; a value of the wrong type
    a ValueError naming the key.
    """
    from valign_jax.cli import resolve_config_path, unknown_key_message
    from valign_jax.recipes import load_config

    path, sep, arg = str(spec).partition(":")
    config = load_config(resolve_config_path(path) + sep + arg)
    changes = {k: v for k, v in {**(overrides or {}), **keys}.items() if v is not None}
    unknown = unknown_key_message([f"--config.{k}=" for k in changes], config)
    if unknown:
        raise KeyError(unknown.replace(" (from --config.", " (from override "))
    flags = []
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        try:
            node[leaf] = value
        except (TypeError, ValueError) as err:
            raise ValueError(f"recipe override {key}={value!r}: {err}") from None
        flags.append(f"--config.{key}={_flag_value(value)}")
    return Recipe(str(spec), config, flags)


def _flag_value(value) -> str:
    """How a value reads on the command line (ml_collections' config flags parse it back)."""
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)
