"""Image–text matching on in-batch hard negatives: the fusion re-ranker's loss, added to the
chosen objective with weight `config.objective.itm_weight` (docs/methods.md §6).

Per image, `itm_negatives` captions drawn from the in-batch similarities (never its own, nor an
identical one), and per caption as many images; the fusion head scores them next to the B true
pairs (out["match_logits"]). More draws give the head more of the pairs it must tell apart per
step (the contrastive loss sees B − 1 negatives per row; the head only what is drawn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from valign_jax import losses
from valign_jax.objectives.base import Auxiliary, Objective, register_auxiliary, unit


def itm_objective(base: Objective, weight: float = 1.0, negatives: int = 1) -> Objective:
    """`base` + weight · image–text matching on hard negatives. Needs a DualEncoder with fusion
    layers."""

    def loss(out, batch, rng):
        if "match_logits" not in out:
            raise ValueError("config.objective.itm_weight > 0 needs a model with fusion layers "
                             "(config.model.fusion_layers > 0)")
        value, metrics = base(out, batch, rng)
        similarity = unit(out["image"]) @ unit(out["text"]).T * jnp.exp(out["logit_scale"])
        ids = batch["input_ids"]
        same_caption = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
        image_tokens, text_tokens = out["image_tokens"], out["text_tokens"]
        mask = out["text_mask"]

        def match(image, text, text_mask):
            return out["apply"]("match_logits", image, text, text_mask)
        neg_logits, neg_valid = [], []
        for draw in range(negatives):
            text_rng, image_rng = jax.random.split(jax.random.fold_in(rng, 1 + draw))
            neg_text, text_ok = losses.sample_hard_negatives(text_rng, similarity, same_caption)
            neg_image, image_ok = losses.sample_hard_negatives(image_rng, similarity.T,
                                                               same_caption)
            neg_logits += [match(image_tokens, text_tokens[neg_text], mask[neg_text]),
                           match(image_tokens[neg_image], text_tokens, mask)]
            neg_valid += [text_ok, image_ok]
        matching = losses.itm(out["match_logits"], neg_logits, neg_valid)
        accuracy = jnp.mean(jnp.concatenate([out["match_logits"] > 0]
                                            + [logits < 0 for logits in neg_logits]))
        return value + weight * matching, {**metrics, "loss_contrastive": value,
                                           "loss_itm": matching, "itm_accuracy": accuracy}
    return Objective(loss, base.needs | {"model"})


def _check(config) -> list[str]:
    if not config.model.fusion_layers:
        return ["config.objective.itm_weight > 0 needs a model with fusion layers "
                "(config.model.fusion_layers > 0; it is 0)"]
    return []


register_auxiliary(Auxiliary(
    name="itm", weight_key="itm_weight", check=_check,
    wrap=lambda objective, cfg: itm_objective(objective, cfg.itm_weight,
                                              cfg.get("itm_negatives", 1)),
    help="image-text matching of the fusion head on in-batch hard negatives",
    options={"itm_negatives": 1}))
