"""valign_jax: contrastive alignment of vision and language towers in JAX/Flax.

Importing the package is cheap and pulls in no data stack (TensorFlow, tfds, grain, clu): the
submodules that need them are imported only when used.
"""

__version__ = "0.1.0"


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
