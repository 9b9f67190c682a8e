"""valign_jax: contrastive alignment of vision and language towers in JAX/Flax.

Importing the package is cheap and pulls in no data stack (TensorFlow, tfds, grain, clu): the
submodules that need them are imported only when used.
"""

__version__ = "0.1.0"
