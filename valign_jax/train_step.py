"""The train step shared by every recipe: forward, objective, gradients of the trainable
parameters only, optimizer update, logit-scale clamp. Imports only jax/flax/optax.

Frozen parameters are split off before differentiation (peft.split), so XLA never computes
their weight gradients; they pass through the step untouched, bit for bit.

The objective (valign_jax/objectives) is a function of the model's outputs; the step gives it
what it declares in `objective.needs` (a teacher's outputs, a second caption's features, the
model itself) and knows nothing else about it.
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


def model_outputs(model, params, batch, objective, teacher_params=None) -> dict:
    """The model's outputs on `batch`, with what `objective.needs` asks for (objectives/base.py
    lists what each need provides)."""
    needs = getattr(objective, "needs", frozenset())
    inputs, long_inputs = model_inputs(batch)
    variables = {"params": params}
    out = dict(model.apply(variables, *inputs))
    if "second_caption" in needs:
        if long_inputs is None:
            raise ValueError("the objective needs a second caption per image, but the batch "
                             "has none (long_input_ids / long_text_features)")
        out["text_long"] = model.apply(variables, *long_inputs, method=model.encode_text)
    if "teacher" in needs:
        if teacher_params is None:
            raise ValueError("the objective needs a teacher: pass its parameters to the step")
        out["teacher"] = model.apply({"params": jax.lax.stop_gradient(teacher_params)},
                                     *inputs)
    if "model" in needs:  # a method's name, or a function (module, *args) run as one
        out["apply"] = lambda method, *args: model.apply(
            variables, *args, method=method if callable(method) else getattr(model, method))
    return out


def make_train_step(model, optimizer: optax.GradientTransformation, labels,
                    objective: Callable, logit_preset: str | None = None,
                    skip_nonfinite: bool = False):
    """step(state, batch[, teacher_params]) -> (state, metrics).

    skip_nonfinite: a step whose loss, gradient norm or updated parameters are not finite keeps
    the parameters and the optimizer state it was given, bit for bit; it still advances `step` and the rng (its
    batch is consumed), adds one to `skipped_steps` and reports metrics["skipped"] = 1.

    batch: see `model_inputs`. teacher_params (objectives that need a teacher, e.g.
    CLIP-Refine's HyCD): a frozen copy of the initial parameters or another checkpoint's,
    passed in each call rather than held in the state, so it has no optimizer state and is
    never differentiated.
    """

    def step(state: TrainState, batch, teacher_params=None):
        rng, step_rng = jax.random.split(state.rng)
        trainable, frozen = peft.split(state.params, labels)
        frozen = jax.lax.stop_gradient(frozen)

        def loss_fn(trainable):
            params = peft.merge(trainable, frozen)
            out = model_outputs(model, params, batch, objective, teacher_params)
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
        # The updated parameters' norm is finite unless the update made one non-finite (a NaN
        # learning rate, an overflow): the loop never checkpoints such a state.
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(trainable)}
        skipped = jnp.zeros((), jnp.int32)
        if skip_nonfinite:
            finite = (jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
                      & jnp.isfinite(metrics["param_norm"]))
            keep_old = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
            params, opt_state = keep_old(params, state.params), keep_old(opt_state, state.opt_state)
            skipped = 1 - finite.astype(jnp.int32)
            metrics["skipped"] = skipped
        return TrainState(state.step + 1, params, opt_state, rng,
                          state.skipped_steps + skipped), metrics

    return step
