"""Image classification: supervised pretraining of an image tower (docs/methods.md §11).

The classifier is the model's image head: with `config.model.projection_dim` equal to the
number of classes, out["image"] holds one logit per class, and the loss is the softmax
cross-entropy against each example's label (the "labels" need: the pipeline then emits a
record's `label`). Nothing else of the model is read, so the text tower's forward pass is
dropped by the compiler; a recipe freezes it (configs/pretrain.py:image).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from valign_jax.objectives.base import Objective, ObjectiveKind, register


def classification_objective() -> Objective:
    def loss(out, batch, rng):
        del rng
        logits = out["image"].astype(jnp.float32)
        labels = batch["labels"]
        num_classes = logits.shape[-1]
        # A label the head has no logit for would contribute nothing to a one-hot loss and
        # never count as correct: counted, so a too-narrow head shows in the metrics.
        beyond = (labels < 0) | (labels >= num_classes)
        log_probs = jax.nn.log_softmax(logits)
        picked = jnp.take_along_axis(log_probs, jnp.clip(labels, 0, num_classes - 1)[:, None],
                                     axis=-1)[:, 0]
        value = -jnp.mean(jnp.where(beyond, 0.0, picked))
        correct = (jnp.argmax(logits, axis=-1) == labels) & ~beyond
        return value, {"accuracy": jnp.mean(correct),
                       "labels_beyond_head": jnp.sum(beyond).astype(jnp.float32)}
    return Objective(loss, {"labels"})


def _check(config) -> list[str]:
    if config.model.image_head != "linear":
        return [f"config.objective.kind='classification' reads the image head as a linear "
                f"classifier; config.model.image_head={config.model.image_head!r} (set "
                f"'linear')"]
    return []


register(ObjectiveKind(
    name="classification", build=lambda cfg, mesh: classification_objective(), check=_check,
    help="image classification: the image head's outputs (projection_dim = classes) against "
         "each example's label"))
