"""valign_jax: contrastive alignment of vision and language towers in JAX/Flax.

The Python API, one call per step (valign_jax/api.py, valign_jax/figures.py):

    load(model)                        a training workdir or an HF checkpoint, ready to embed
    load_images(spec, image_size)      labelled images from the shapes, class folders or tfds
    zero_shot(model, images)           class probabilities, predictions, accuracy
    recipe(spec, overrides)            a recipe's config with changes, and its command line
    train.train_and_evaluate(config, workdir)   the training loop (python -m valign_jax.main)
    evaluate.evaluate(workdir=...)     a checkpoint's metrics and plots (python -m valign_jax.evaluate)
    plot_predictions(images, result), plot_metrics(workdir), logged_metrics(workdir)
    load_trained(workdir)              (model, params, config) of a run

Importing the package is cheap and pulls in no data stack (TensorFlow, tfds, grain, clu): these
names and the submodules load when first used.
"""

import importlib
import importlib.util

__version__ = "0.1.0"

# name -> the module that defines it, imported on first use
_API = {name: "valign_jax.api" for name in (
    "load", "LoadedModel", "load_images", "ImageSet", "zero_shot", "ZeroShotResult",
    "recipe", "Recipe")}
_API.update({name: "valign_jax.figures" for name in (
    "plot_predictions", "plot_metrics", "logged_metrics")})


def __getattr__(name):
    """The API's names, and submodules (valign_jax.train, valign_jax.evaluate, ...) without
    importing them first."""
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


def load_trained(workdir, step=None):
    """(model, params, config) of a training run: its DualEncoder, the parameters of checkpoint
    `step` (the latest by default) as host arrays, and its config as an ml_collections
    ConfigDict.

        model, params, config = valign_jax.load_trained("/tmp/clip_demo")
        img = model.apply({"params": params}, images, method=model.encode_image)
    """
    from valign_jax.workdir import load_run
    model, params, _, config = load_run(workdir, step)
    return model, params, config
