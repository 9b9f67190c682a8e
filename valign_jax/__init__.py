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
    import json
    import ml_collections

    from valign_jax import checkpointing, storage
    from valign_jax.models.build import from_description

    workdir = storage.path(workdir)  # a local path or a URL (gs://...)
    files = [workdir / checkpointing.MODEL_JSON, workdir / checkpointing.CONFIG_JSON]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: {workdir} is not a valign_jax training "
                                    f"workdir (python -m valign_jax.main ... --workdir=DIR)")
    model = from_description(json.loads(files[0].read_text()), source=str(files[0]))
    config = ml_collections.ConfigDict(json.loads(files[1].read_text()))
    params, _ = checkpointing.restore_params(workdir, step)
    return model, params, config
