"""The pairwise sigmoid loss: SigLIP and SAIL (docs/methods.md §2).

L_ij = exp(t')·x̂_i·ŷ_j + b, and −log σ(±L_ij) summed over every pair of the global batch, the
pairs positive, everything else negative; divided by B (SigLIP, norm="batch") or B² (SAIL,
norm="pairs"). With `multi_positive` each image's second caption (SAIL's long caption) is a
second positive: ½ (ℓ(x, y) + ℓ(x, ỹ)). With `chunked` and a device mesh the loss and its
metrics are computed around a ring of devices, so no device holds the B×B logits.
"""

from __future__ import annotations

import jax.numpy as jnp

from valign_jax import losses, sharding
from valign_jax.objectives.base import (RING_OPTIONS, Objective, ObjectiveKind, batch_metrics,
                                        register, unit)

NORMS = ("batch", "pairs")


def sigmoid_objective(norm: str = "batch", multi_positive: bool = False,
                      mesh=None) -> Objective:
    """Given a mesh, the ring form (losses.chunked_sigmoid)."""
    if norm not in NORMS:
        raise ValueError(f"config.objective.norm={norm!r}; expected one of {NORMS}")

    def loss(out, batch, rng):
        del batch, rng
        img, txt = unit(out["image"]), unit(out["text"])
        scale, bias = jnp.exp(out["logit_scale"]), out.get("logit_bias")
        if bias is None:
            raise ValueError("the sigmoid objective needs a logit bias: choose a logit preset "
                             "with one (config.model.logit_preset='siglip' or 'sail')")
        extra = unit(out["text_long"]) if multi_positive else None
        if mesh is None:
            value = losses.sigmoid(img, txt, scale, bias, norm=norm, txt_extra=extra)
        else:
            value = losses.chunked_sigmoid(img, txt, scale, bias, mesh=mesh,
                                           axis_name=sharding.BATCH_AXES, norm=norm,
                                           txt_extra=extra)
        return value, batch_metrics(img, txt, scale, bias, mesh)
    return Objective(loss, {"second_caption"} if multi_positive else frozenset())


def _build(cfg, mesh):
    return sigmoid_objective(cfg.norm, cfg.multi_positive, mesh if cfg.chunked else None)


def _check(config) -> list[str]:
    preset = losses.LOGIT_SCALE_PRESETS.get(config.model.logit_preset)
    if preset is not None and preset.init_bias is None:
        return [f"config.objective.kind='sigmoid' needs a logit bias, but config.model."
                f"logit_preset={config.model.logit_preset!r} has none; choose one of "
                f"{sorted(k for k, p in losses.LOGIT_SCALE_PRESETS.items() if p.init_bias is not None)}"]
    return []


register(ObjectiveKind(
    name="sigmoid", build=_build, check=_check,
    help="SigLIP's pairwise sigmoid loss (SAIL: norm='pairs', multi_positive=True)",
    options={"norm": "batch", "multi_positive": False, **RING_OPTIONS}))
