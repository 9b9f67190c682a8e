"""The softmax contrastive loss (CLIP's InfoNCE): CLIP, LiT, LiLT (docs/methods.md §1).

logits = exp(logit_scale) · x̂ ŷᵀ over the global batch; the mean of the row-wise (image → text)
and column-wise (text → image) cross-entropies with the pairs on the diagonal. With `chunked`
and a device mesh the loss and its metrics are computed around a ring of devices
(docs/methods.md §9), so no device holds the B×B logits.
"""

from __future__ import annotations

import jax.numpy as jnp

from valign_jax import losses, sharding
from valign_jax.objectives.base import (RING_OPTIONS, Objective, ObjectiveKind, batch_metrics,
                                        register, unit)


def contrastive_objective(mesh=None) -> Objective:
    """Given a mesh, the ring form (losses.chunked_softmax_contrastive)."""

    def loss(out, batch, rng):
        del batch, rng
        img, txt = unit(out["image"]), unit(out["text"])
        scale, bias = jnp.exp(out["logit_scale"]), out.get("logit_bias")
        if mesh is None:
            value = losses.softmax_contrastive(img, txt, scale)
        else:
            value = losses.chunked_softmax_contrastive(img, txt, scale, mesh=mesh,
                                                       axis_name=sharding.BATCH_AXES)
        return value, batch_metrics(img, txt, scale, bias, mesh)
    return Objective(loss)


def _build(cfg, mesh):
    return contrastive_objective(mesh if cfg.chunked else None)


register(ObjectiveKind(
    name="softmax", build=_build, options=dict(RING_OPTIONS),
    help="CLIP's softmax contrastive loss over the global batch"))
