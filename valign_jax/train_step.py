"""The train step shared by every recipe: forward, objective, gradients of the trainable
parameters only, optimizer update, logit-scale clamp. Imports only jax/flax/optax.

Frozen parameters are split off before differentiation (peft.split), so XLA never computes
their weight gradients; they pass through the step untouched, bit for bit.

The objective (valign_jax/objectives) is a function of the model's outputs; the step gives it
what it declares in `objective.needs` (a teacher's outputs, a second caption's features, the
model itself) and knows nothing else about it.

With `micro_batches = k > 1` the gradients come from gradient caching (docs/methods.md §8):
the towers run over the batch in k chunks, the objective sees the whole batch's outputs once,
and each chunk is run again and back-propagated from its rows of the outputs' gradient. The
step is still the whole batch's step (same loss, gradients and update, up to the order of
float sums) while activations are held for one chunk at a time.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from valign_jax import losses, peft, sharding


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


def _own_outputs(model, params, batch, needs) -> dict:
    """The model's outputs under the parameters being trained (and the second caption's
    features if the objective needs them): everything the gradient flows through."""
    inputs, long_inputs = model_inputs(batch)
    variables = {"params": params}
    out = dict(model.apply(variables, *inputs))
    if "second_caption" in needs:
        if long_inputs is None:
            raise ValueError("the objective needs a second caption per image, but the batch "
                             "has none (long_input_ids / long_text_features)")
        out["text_long"] = model.apply(variables, *long_inputs, method=model.encode_text)
    return out


def _teacher_outputs(model, teacher_params, batch) -> dict:
    if teacher_params is None:
        raise ValueError("the objective needs a teacher: pass its parameters to the step")
    inputs, _ = model_inputs(batch)
    return model.apply({"params": jax.lax.stop_gradient(teacher_params)}, *inputs)


def model_outputs(model, params, batch, objective, teacher_params=None) -> dict:
    """The model's outputs on `batch`, with what `objective.needs` asks for (objectives/base.py
    lists what each need provides)."""
    needs = getattr(objective, "needs", frozenset())
    out = _own_outputs(model, params, batch, needs)
    if "teacher" in needs:
        out["teacher"] = _teacher_outputs(model, teacher_params, batch)
    if "model" in needs:  # a method's name, or a function (module, *args) run as one
        variables = {"params": params}
        out["apply"] = lambda method, *args: model.apply(
            variables, *args, method=method if callable(method) else getattr(model, method))
    return out


# ---------------------------------------------------------------------------------------------
# Gradients: of the whole batch at once, or by gradient caching over micro-batches


def _dense_gradients(model, objective, trainable, frozen, batch, rng, teacher_params):
    def loss_fn(trainable):
        params = peft.merge(trainable, frozen)
        out = model_outputs(model, params, batch, objective, teacher_params)
        return objective(out, batch, rng)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return loss, metrics, grads


def split_micro_batches(tree, k: int):
    """Leaves (B, ...) -> (k, B/k, ...): micro-batch j holds rows j, j + k, j + 2k, ...

    Strided rather than contiguous so that on a batch sharded by rows (device d holds a
    contiguous block) every micro-batch takes B/(k·n) rows from each device's own block:
    splitting, and joining back, moves no data between devices."""
    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"a batch of {x.shape[0]} rows does not split into "
                             f"config.micro_batches={k} equal micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.tree.map(one, tree)


def join_micro_batches(tree):
    """The inverse of `split_micro_batches`: (k, B/k, ...) -> (B, ...) in the batch's order."""
    def one(x):
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return jax.tree.map(one, tree)


def _join_outputs(stacked: dict) -> dict:
    """Per-micro-batch model outputs, stacked on a leading axis, as the whole batch's: rows
    joined in the batch's order; a scalar (a parameter the model passes through: the logit
    scale and bias) is the same in every micro-batch and is taken once."""
    return {name: x[0] if x.ndim == 1 else join_micro_batches(x) for name, x in stacked.items()}


def _split_cotangents(grads: dict, k: int) -> dict:
    """The loss's gradient w.r.t. the whole batch's outputs, as each micro-batch's share: its
    rows; a scalar output's gradient goes to micro-batch 0 alone (it reaches the parameter
    once, as in the whole-batch step)."""
    def one(g):
        if g.ndim == 0:
            return jnp.zeros((k,), g.dtype).at[0].set(g)
        return split_micro_batches(g, k)
    return {name: one(g) for name, g in grads.items()}


def _constrain(tree, mesh, batch_dim: int):
    """Keep rows on the devices that own them: the batch dim sharded like the batch."""
    if mesh is None:
        return tree

    def one(x):
        spec = P(*([None] * batch_dim), sharding.BATCH_AXES) if x.ndim > batch_dim else P()
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.tree.map(one, tree)


def _differentiable(out: dict):
    """(floating outputs, the rest): a fusion model's text mask is an int array."""
    floats = {k: v for k, v in out.items() if jnp.issubdtype(v.dtype, jnp.inexact)}
    return floats, {k: v for k, v in out.items() if k not in floats}


def _cached_gradients(model, objective, k: int, mesh, trainable, frozen, batch, rng,
                      teacher_params):
    """Gradient caching (Gao et al. 2021; docs/methods.md §8), in three passes:
    1. the towers over every micro-batch (lax.map: one compiled body whatever k), keeping no
       activations, only the outputs: B rows of features;
    2. the objective on the whole batch's outputs, and its gradient w.r.t. those outputs;
    3. each micro-batch again under `jax.vjp`, pulled back from its rows of that gradient,
       parameter gradients summed over micro-batches (lax.scan).
    The towers are deterministic (no dropout), so passes 1 and 3 compute the same outputs; the
    objective's randomness (RaFA's references) is drawn once, in pass 2, from the step's rng,
    as in the whole-batch step. A teacher runs per micro-batch in pass 1 only."""
    needs = objective.needs
    if "model" in needs:
        raise ValueError("config.micro_batches > 1 computes the objective from cached outputs, "
                         "but this objective needs the model itself inside its loss "
                         "(objective.needs has 'model'); use config.micro_batches=1")
    params_of = lambda t: peft.merge(t, frozen)
    chunks = _constrain(split_micro_batches(batch, k), mesh, 1)

    def forward(chunk):
        chunk = _constrain(chunk, mesh, 0)
        own = _own_outputs(model, params_of(trainable), chunk, needs)
        teacher = _teacher_outputs(model, teacher_params, chunk) if "teacher" in needs else {}
        return own, teacher

    own, teacher = jax.lax.map(forward, chunks)
    own, teacher = _constrain(_join_outputs(own), mesh, 0), _join_outputs(teacher)
    floats, rest = _differentiable(own)

    def loss_of_outputs(floats):
        out = {**rest, **floats}
        if "teacher" in needs:
            out["teacher"] = teacher
        return objective(out, batch, rng)

    (loss, metrics), d_out = jax.value_and_grad(loss_of_outputs, has_aux=True)(floats)
    cotangents = _constrain(_split_cotangents(d_out, k), mesh, 1)

    def accumulate(total, chunk_and_cotangent):
        chunk, cotangent = chunk_and_cotangent
        chunk = _constrain(chunk, mesh, 0)
        outputs = lambda t: _differentiable(_own_outputs(model, params_of(t), chunk, needs))[0]
        _, pullback = jax.vjp(outputs, trainable)
        (grads,) = pullback(cotangent)
        return jax.tree.map(jnp.add, total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    grads, _ = jax.lax.scan(accumulate, zeros, (chunks, cotangents))
    return loss, metrics, grads


def make_train_step(model, optimizer: optax.GradientTransformation, labels,
                    objective: Callable, logit_preset: str | None = None,
                    skip_nonfinite: bool = False, micro_batches: int = 1, mesh=None):
    """step(state, batch[, teacher_params]) -> (state, metrics).

    skip_nonfinite: a step whose loss, gradient norm or updated parameters are not finite keeps
    the parameters and the optimizer state it was given, bit for bit; it still advances `step` and the rng (its
    batch is consumed), adds one to `skipped_steps` and reports metrics["skipped"] = 1.

    micro_batches: k > 1 computes the gradients by gradient caching over k micro-batches
    (`_cached_gradients`); the batch must split into k equal micro-batches (on a mesh, each
    device's rows too: config_checks says so first). mesh: where the batch is sharded, so the
    micro-batches stay on the devices that hold their rows.

    batch: see `model_inputs`. teacher_params (objectives that need a teacher, e.g.
    CLIP-Refine's HyCD): a frozen copy of the initial parameters or another checkpoint's,
    passed in each call rather than held in the state, so it has no optimizer state and is
    never differentiated.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches}: must be >= 1")
    if micro_batches > 1:
        gradients = functools.partial(_cached_gradients, model, objective, micro_batches, mesh)
    else:
        gradients = functools.partial(_dense_gradients, model, objective)

    def step(state: TrainState, batch, teacher_params=None):
        rng, step_rng = jax.random.split(state.rng)
        trainable, frozen = peft.split(state.params, labels)
        frozen = jax.lax.stop_gradient(frozen)
        loss, metrics, grads = gradients(trainable, frozen, batch, step_rng, teacher_params)
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
