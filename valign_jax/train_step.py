"""The train step shared by every recipe: forward, objective, gradients of the trainable
parameters only, optimizer update, logit-scale clamp. Imports only jax/flax/optax.

Frozen parameters are split off before differentiation (peft.split), so XLA never computes
their weight gradients; they pass through the step untouched, bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from valign_jax import losses, peft


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array  # steps whose update was dropped as non-finite (skip_nonfinite)


def create_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=rng,
                      skipped_steps=jnp.zeros((), jnp.int32))


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def contrastive_objective(kind: str = "softmax", norm: str = "batch", mesh=None,
                          batch_axes=("data", "fsdp")) -> Callable:
    """(outputs, batch, rng) -> (loss, metrics) for the softmax or sigmoid loss.

    With a second caption per image (out["text_long"], SAIL's long captions) the sigmoid loss
    is multi-positive: ½ (ℓ(x, y) + ℓ(x, ỹ)). Given a mesh, the sigmoid loss is the
    ring-chunked one: no device ever holds the whole B×B logit matrix.
    """
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"config.objective.kind={kind!r}; expected 'softmax', 'sigmoid' or "
                         f"'clip_refine'")

    def objective(out, batch, rng):
        del batch, rng
        img, txt = _unit(out["image"]), _unit(out["text"])
        scale = jnp.exp(out["logit_scale"])
        bias = out.get("logit_bias")
        if kind == "softmax":
            loss = losses.softmax_contrastive(img, txt, scale)
        else:
            extra = _unit(out["text_long"]) if "text_long" in out else None
            if mesh is None:
                loss = losses.sigmoid(img, txt, scale, bias, norm=norm, txt_extra=extra)
            else:
                loss = losses.chunked_sigmoid(img, txt, scale, bias, mesh=mesh,
                                              axis_name=batch_axes, norm=norm, txt_extra=extra)
        return loss, losses.contrastive_metrics(img, txt, scale, bias)
    return objective


def clip_refine_objective(weights=(0.0, 1.0, 1.0), prior_std: float = 1.0,
                          rafa_form: str = "official", alpha: float = 0.5,
                          temperature: float = 1.0, hycd_features: str = "raw") -> Callable:
    """CLIP-Refine: λ_clip·L_CLIP + λ_rafa·L_RaFA + λ_hycd·L_HyCD (METHODS.md §3).

    RaFA's references r ~ N(0, prior_std² I) are drawn here, inside the step, from the step's
    own rng: fresh every step, one per pair, shared by its image and text. Both RaFA and HyCD
    see the un-normalised projected features; hycd_features="normalized" L2-normalises them for
    HyCD instead. Needs the teacher's outputs in out["teacher"] (make_train_step's teacher).
    """
    clip_weight, rafa_weight, hycd_weight = weights

    def objective(out, batch, rng):
        del batch
        z_img, z_txt = out["image"], out["text"]
        teacher = out["teacher"]
        t_img, t_txt = teacher["image"], teacher["text"]
        img, txt = _unit(z_img), _unit(z_txt)
        scale = jnp.exp(out["logit_scale"])
        ref = losses.sample_rafa_reference(rng, z_img.shape[0], z_img.shape[-1], prior_std)
        parts = {"rafa": losses.rafa(z_img, z_txt, ref, form=rafa_form)}
        if hycd_features == "normalized":
            z_img, z_txt, t_img, t_txt = img, txt, _unit(t_img), _unit(t_txt)
        parts["hycd"] = losses.hycd(z_img, z_txt, t_img, t_txt, alpha, temperature)
        parts["clip"] = losses.softmax_contrastive(img, txt, scale)
        loss = clip_weight * parts["clip"] + rafa_weight * parts["rafa"] + hycd_weight * parts[
            "hycd"]
        metrics = losses.contrastive_metrics(img, txt, scale)
        return loss, {**metrics, **{f"loss_{k}": v for k, v in parts.items()}}
    return objective


def itm_objective(base: Callable, weight: float = 1.0, negatives: int = 1) -> Callable:
    """`base` (the contrastive objective) + weight · image–text matching on hard negatives.

    Per image, `negatives` captions drawn from the in-batch similarities (never its own, nor an
    identical one), and per caption as many images; the fusion head scores them next to the B
    true pairs (out["match_logits"]). Needs a DualEncoder with fusion layers: out["match"]
    scores pairs. More draws give the head more of the pairs it must tell apart per step (the
    contrastive loss sees B - 1 negatives per row; the head only what is drawn).
    """

    def objective(out, batch, rng):
        if "match" not in out:
            raise ValueError("config.objective.itm_weight > 0 needs a model with fusion layers "
                             "(config.model.fusion_layers > 0)")
        loss, metrics = base(out, batch, rng)
        similarity = _unit(out["image"]) @ _unit(out["text"]).T * jnp.exp(out["logit_scale"])
        ids = batch["input_ids"]
        same_caption = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
        image_tokens, text_tokens, mask = out["image_tokens"], out["text_tokens"], out[
            "text_mask"]
        neg_logits, neg_valid = [], []
        for draw in range(negatives):
            text_rng, image_rng = jax.random.split(jax.random.fold_in(rng, 1 + draw))
            neg_text, text_ok = losses.sample_hard_negatives(text_rng, similarity, same_caption)
            neg_image, image_ok = losses.sample_hard_negatives(image_rng, similarity.T,
                                                               same_caption)
            neg_logits += [out["match"](image_tokens, text_tokens[neg_text], mask[neg_text]),
                           out["match"](image_tokens[neg_image], text_tokens, mask)]
            neg_valid += [text_ok, image_ok]
        matching = losses.itm(out["match_logits"], neg_logits, neg_valid)
        accuracy = jnp.mean(jnp.concatenate([out["match_logits"] > 0]
                                            + [logits < 0 for logits in neg_logits]))
        return loss + weight * matching, {**metrics, "loss_contrastive": loss,
                                          "loss_itm": matching, "itm_accuracy": accuracy}
    return objective


def model_inputs(batch):
    """(image, text, mask) for the model, and (text, mask) of the second caption or None.

    A batch holds either raw inputs (pixel_values, input_ids, attention_mask[, long_input_ids,
    long_attention_mask]) or cached tower features (image_features, text_features[,
    long_text_features]), which FeaturesTowers pass straight to the heads.
    """
    if "image_features" in batch:
        long = batch.get("long_text_features")
        return ((batch["image_features"], batch["text_features"], None),
                None if long is None else (long, None))
    long = (batch["long_input_ids"], batch["long_attention_mask"]) \
        if "long_input_ids" in batch else None
    return (batch["pixel_values"], batch["input_ids"], batch["attention_mask"]), long


def make_train_step(model, optimizer: optax.GradientTransformation, labels,
                    objective: Callable, logit_preset: str | None = None,
                    skip_nonfinite: bool = False):
    """step(state, batch[, teacher_params]) -> (state, metrics).

    skip_nonfinite: a step whose loss or gradient norm is not finite keeps the parameters and
    the optimizer state it was given, bit for bit; it still advances `step` and the rng (its
    batch is consumed), adds one to `skipped_steps` and reports metrics["skipped"] = 1.

    batch: see `model_inputs`; a second caption per image (SAIL's long captions) is encoded as
    out["text_long"]. teacher_params (CLIP-Refine's HyCD): a frozen copy of the initial
    parameters or another checkpoint's, passed in each call rather than held in the state, so
    it has no optimizer state and is never differentiated; its outputs reach the objective as
    out["teacher"].
    """

    def step(state: TrainState, batch, teacher_params=None):
        rng, step_rng = jax.random.split(state.rng)
        trainable, frozen = peft.split(state.params, labels)
        frozen = jax.lax.stop_gradient(frozen)
        inputs, long_inputs = model_inputs(batch)
        teacher_out = None
        if teacher_params is not None:
            teacher_out = model.apply({"params": jax.lax.stop_gradient(teacher_params)}, *inputs)

        def loss_fn(trainable):
            params = {"params": peft.merge(trainable, frozen)}
            out = model.apply(params, *inputs)
            if getattr(model, "fusion_layers", 0):  # itm_objective scores other pairings
                out["match"] = functools.partial(model.apply, params, method=model.match_logits)
            if long_inputs is not None:
                out["text_long"] = model.apply(params, *long_inputs, method=model.encode_text)
            if teacher_out is not None:
                out = {**out, "teacher": teacher_out}
            return objective(out, batch, step_rng)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        # The partitioned optimizer wants the full tree; frozen slots get zeros that its
        # set_to_zero branch never reads (XLA drops them).
        full_grads = peft.merge(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen))
        updates, opt_state = optimizer.update(full_grads, state.opt_state, state.params)
        updates, _ = peft.split(updates, labels)
        trainable = optax.apply_updates(trainable, updates)
        if logit_preset and ("logit_scale",) in trainable:
            trainable[("logit_scale",)] = losses.clamp_log_scale(trainable[("logit_scale",)],
                                                                 logit_preset)
        params = peft.merge(trainable, frozen)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        skipped = jnp.zeros((), jnp.int32)
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
            keep_old = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
            params, opt_state = keep_old(params, state.params), keep_old(opt_state, state.opt_state)
            skipped = 1 - finite.astype(jnp.int32)
            metrics["skipped"] = skipped
        return TrainState(state.step + 1, params, opt_state, rng,
                          state.skipped_steps + skipped), metrics

    return step
