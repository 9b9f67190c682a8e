"""The train step shared by every recipe: forward, objective, gradients of the trainable
parameters only, optimizer update, logit-scale clamp. Imports only jax/flax/optax.

Frozen parameters are split off before differentiation (peft.split), so XLA never computes
their weight gradients; they pass through the step untouched, bit for bit.
"""

from __future__ import annotations

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


def create_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=rng)


def contrastive_objective(kind: str = "softmax", norm: str = "batch") -> Callable:
    """(outputs, batch, rng) -> (loss, metrics) for the softmax or sigmoid loss."""
    def objective(out, batch, rng):
        del batch, rng
        img = out["image"] / jnp.linalg.norm(out["image"], axis=-1, keepdims=True)
        txt = out["text"] / jnp.linalg.norm(out["text"], axis=-1, keepdims=True)
        scale = jnp.exp(out["logit_scale"])
        bias = out.get("logit_bias")
        if kind == "softmax":
            loss = losses.softmax_contrastive(img, txt, scale)
        elif kind == "sigmoid":
            loss = losses.sigmoid(img, txt, scale, bias, norm=norm)
        else:
            raise ValueError(f"objective {kind!r}; expected 'softmax' or 'sigmoid'")
        return loss, losses.contrastive_metrics(img, txt, scale, bias)
    return objective


def make_train_step(model, optimizer: optax.GradientTransformation, labels,
                    objective: Callable, logit_preset: str | None = None):
    """step(state, batch) -> (state, metrics); batch: pixel_values, input_ids, attention_mask."""

    def step(state: TrainState, batch):
        rng, step_rng = jax.random.split(state.rng)
        trainable, frozen = peft.split(state.params, labels)
        frozen = jax.lax.stop_gradient(frozen)

        def loss_fn(trainable):
            out = model.apply({"params": peft.merge(trainable, frozen)}, batch["pixel_values"],
                              batch["input_ids"], batch["attention_mask"])
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
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    return step
