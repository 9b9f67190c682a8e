"""The softmax contrastive loss (CLIP's InfoNCE): CLIP, LiT, LiLT (docs/methods.md §1).

logits = exp(logit_scale) · x̂ ŷᵀ over the global batch; the mean of the row-wise (image → text)
and column-wise (text → image) cross-entropies with the pairs on the diagonal.
"""

from __future__ import annotations

import jax.numpy as jnp

from valign_jax import losses
from valign_jax.objectives.base import Objective, ObjectiveKind, register, unit


def contrastive_objective() -> Objective:
    def loss(out, batch, rng):
        del batch, rng
        img, txt = unit(out["image"]), unit(out["text"])
        scale = jnp.exp(out["logit_scale"])
        return (losses.softmax_contrastive(img, txt, scale),
                losses.contrastive_metrics(img, txt, scale, out.get("logit_bias")))
    return Objective(loss)


register(ObjectiveKind(
    name="softmax", build=lambda cfg, mesh: contrastive_objective(),
    help="CLIP's softmax contrastive loss over the global batch"))
