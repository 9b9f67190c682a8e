"""CLIP-Refine: λ_clip·L_CLIP + λ_rafa·L_RaFA + λ_hycd·L_HyCD (docs/methods.md §3).

A short post-pre-training of a pretrained CLIP that closes its modality gap. RaFA pulls both
modalities' un-normalised projected features towards references r ~ N(0, prior_std² I), drawn
here from the step's own rng: fresh every step, one per pair, shared by its image and its text.
HyCD distils the frozen teacher's (the run's initial model's) similarities mixed with the
identity. Options live in `config.objective.clip_refine`.
"""

from __future__ import annotations

import jax.numpy as jnp

from valign_jax import losses
from valign_jax.objectives.base import Objective, ObjectiveKind, register, unit

RAFA_FORMS = ("official", "paper")
HYCD_FEATURES = ("raw", "normalized")


def clip_refine_objective(weights=(0.0, 1.0, 1.0), prior_std: float = 1.0,
                          rafa_form: str = "official", alpha: float = 0.5,
                          temperature: float = 1.0, hycd_features: str = "raw") -> Objective:
    """Both RaFA and HyCD see the un-normalised projected features; hycd_features="normalized"
    L2-normalises them for HyCD instead."""
    clip_weight, rafa_weight, hycd_weight = weights

    def loss(out, batch, rng):
        del batch
        z_img, z_txt = out["image"], out["text"]
        t_img, t_txt = out["teacher"]["image"], out["teacher"]["text"]
        img, txt = unit(z_img), unit(z_txt)
        scale = jnp.exp(out["logit_scale"])
        ref = losses.sample_rafa_reference(rng, z_img.shape[0], z_img.shape[-1], prior_std)
        parts = {"rafa": losses.rafa(z_img, z_txt, ref, form=rafa_form)}
        if hycd_features == "normalized":
            z_img, z_txt, t_img, t_txt = img, txt, unit(t_img), unit(t_txt)
        parts["hycd"] = losses.hycd(z_img, z_txt, t_img, t_txt, alpha, temperature)
        parts["clip"] = losses.softmax_contrastive(img, txt, scale)
        value = (clip_weight * parts["clip"] + rafa_weight * parts["rafa"]
                 + hycd_weight * parts["hycd"])
        metrics = losses.contrastive_metrics(img, txt, scale)
        return value, {**metrics, **{f"loss_{k}": v for k, v in parts.items()}}
    return Objective(loss, {"teacher"})


def _build(cfg, mesh):
    c = cfg.clip_refine
    return clip_refine_objective(tuple(c.weights), c.prior_std, c.rafa_form, c.alpha,
                                 c.temperature, c.hycd_features)


def _check(config) -> list[str]:
    c, problems = config.objective.clip_refine, []
    if len(c.weights) != 3:
        problems.append(f"config.objective.clip_refine.weights={tuple(c.weights)}: expected "
                        f"three weights (CLIP, RaFA, HyCD)")
    return problems


register(ObjectiveKind(
    name="clip_refine", build=_build, check=_check,
    help="CLIP-Refine's RaFA + HyCD post-pre-training against a frozen teacher",
    options={"clip_refine": None}))  # its own sub-config; defaults in the schema
