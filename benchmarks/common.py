"""What every benchmark shares: the machine it ran on, timing, compiled memory and FLOPs, and
the CLIP train step (ours, through `make_train_step`) at given sizes.

Imports only jax, flax, optax, numpy and valign_jax's core (no ml_collections, TensorFlow or
transformers), so the accelerator path runs on an image that has nothing else.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from valign_jax import optim, peft
from valign_jax.models import DualEncoder
from valign_jax.models.registry import preset
from valign_jax.objectives import contrastive_objective
from valign_jax.train_step import create_state, make_train_step


class Settings(dict):
    """A dict read by attribute, as optim.make_optimizer reads a ConfigDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# LiLT's AdamW (configs/lilt.py) with a short warm-up; the schedule does not change the cost.
ADAMW = Settings(name="adamw", lr=1e-4, warmup_init_lr=1e-5, end_lr=1e-5, warmup_steps=10,
                 b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.02, grad_clip_norm=0.0)
LION = Settings(ADAMW, name="lion", b2=0.99, weight_decay=1e-4)  # SAIL's optimizer
LWA_ADAPTER = 192  # LiLT's bottleneck for base towers (configs/lilt.py)


def machine() -> dict:
    """The machine a figure was measured on."""
    device = jax.devices()[0]
    return {"host": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "backend": jax.default_backend(), "device_kind": device.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__,
            "date": datetime.date.today().isoformat()}


def step_times(programs: dict, warmup: int, repeats: int) -> dict:
    """Median seconds per step of each jitted `step(state, batch)` in `programs` (name ->
    (step, state, batch)), state donated and fed back as a training loop does; `programs` is
    updated with the last states (the ones it held are donated).

    The programs take turns, one step each per round, so load from other processes on a shared
    machine falls on all of them alike; the `warmup` rounds are not counted.
    """
    states = {name: state for name, (_, state, _) in programs.items()}
    times = {name: [] for name in programs}
    for round_ in range(warmup + repeats):
        for name, (step, _, batch) in programs.items():
            start = time.perf_counter()
            states[name], metrics = step(states[name], batch)
            jax.block_until_ready((states[name], metrics))
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    programs.update({name: (step, states[name], batch)
                     for name, (step, _, batch) in programs.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def program_memory(compiled) -> dict:
    """Bytes of one compiled program as XLA plans them (per device): arguments, outputs,
    temporaries, and the peak = arguments + outputs + temporaries - donated (aliased) bytes."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    out = {name: int(getattr(stats, f"{name}_size_in_bytes"))
           for name in ("argument", "output", "temp", "alias")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def program_flops(program) -> float | None:
    """XLA's FLOP count of a compiled (or lowered) program. A `scan`ned layer body counts once,
    not once per layer: count FLOPs on unrolled layers."""
    cost = program.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device
        cost = cost[0]
    if not cost or "flops" not in cost:  # e.g. a lowered program on GPU
        return None
    return float(cost["flops"])


def matmul_flops(fn, *args) -> float:
    """FLOPs of the matrix products (dot_general, convolutions) `fn(*args)` traces to, 2 per
    multiply-add: what model FLOPs utilisation counts. Read from the jaxpr, so it is the same on
    every backend (XLA's GPU cost analysis leaves out library GEMMs) and counts a `scan`ned
    layer once per layer."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * out * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # each output sums over a kernel's in-features x window
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * out * math.prod(rhs) / out_features
        trips = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    total += trips * _jaxpr_flops(inner)
    return total


@dataclasses.dataclass(frozen=True)
class ClipSizes:
    """A dual encoder and its batch: tower presets, optionally with fewer layers or pixels."""

    image_preset: str = "vit_b16"
    text_preset: str = "bert_base"
    image_size: int = 224
    text_length: int = 64
    batch: int = 8
    layers: int = 0          # 0: the preset's
    projection_dim: int = 256
    dtype: str = "float32"

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def clip_model(sizes: ClipSizes, adapters: int = 0, **run_options) -> DualEncoder:
    """The dual encoder at `sizes`; run_options (scan_layers, remat, attention_impl) go to both
    towers, as config.model's do."""
    layers = {"num_hidden_layers": sizes.layers} if sizes.layers else {}
    common = dict(dtype=sizes.dtype, adapter_dim=adapters, **layers, **run_options)
    return DualEncoder(preset(sizes.image_preset, image_size=sizes.image_size, **common),
                       preset(sizes.text_preset, **common), projection_dim=sizes.projection_dim)


def clip_batch(sizes: ClipSizes, seed: int = 0) -> dict:
    """Random pixels in [-1, 1] and token ids with a few padded positions."""
    rng = np.random.default_rng(seed)
    b, n = sizes.batch, sizes.text_length
    mask = np.ones((b, n), np.int32)
    mask[:, n - n // 4:] = 0  # a quarter padding, as short captions have
    return {"pixel_values": rng.uniform(-1, 1, (b, sizes.image_size, sizes.image_size, 3))
            .astype(np.float32),
            "input_ids": rng.integers(1, 500, (b, n)).astype(np.int32) * mask,
            "attention_mask": mask}


def init_params(model, seed: int = 0):
    """Parameters of `model`'s shapes, filled on the host: N(0, 0.02) weights, LayerNorm scales
    1, biases and scalars 0. (Compiling a model's `init` takes XLA seconds to minutes on a CPU;
    the values do not change a step's cost.)"""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs()))
    return random_params(shapes["params"], seed)


def random_params(shapes, seed: int = 0):
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if getattr(path[-1], "key", None) == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if leaf.ndim < 2:
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def compiled_train_step(model, recipe: str, batch, settings=ADAMW, objective=None,
                        logit_preset: str = "clip", params=None, micro_batches: int = 1):
    """Our train step for `model` under a PEFT recipe, jitted with the state donated (as
    train.make_trainer does) and compiled for `batch`; returns (compiled step, state, extra)
    where extra holds the compile seconds and trainable / total parameter counts.
    With params=None only shapes are used (nothing is allocated): for cost analysis.
    micro_batches: k > 1 compiles the gradient-caching step (config.micro_batches)."""
    lowered, state, step, labels, lower_s = lowered_train_step(model, recipe, batch, settings,
                                                               objective, logit_preset, params,
                                                               micro_batches)
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = lower_s + time.perf_counter() - start
    trainable, total = peft.count(state.params, labels)
    return compiled, state, {"compile_s": seconds, "matmul_flops": matmul_flops(step, state, batch),
                             "trainable_params": int(trainable), "total_params": int(total)}


def lowered_train_step(model, recipe: str, batch, settings=ADAMW, objective=None,
                       logit_preset: str = "clip", params=None, micro_batches: int = 1):
    """(lowered step, state, step function, labels, seconds spent lowering): the step of
    compiled_train_step, lowered for `batch` but not compiled. With params=None the state
    holds only shapes."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs()))
    labels = peft.make_labels(shapes["params"], recipe)
    optimizer = optim.make_optimizer(settings, labels, total_steps=1000)
    step = make_train_step(model, optimizer, labels, objective or contrastive_objective(),
                           logit_preset, micro_batches=micro_batches)
    make_state = jax.jit(lambda p: create_state(p, optimizer, jax.random.PRNGKey(1)))
    state = jax.eval_shape(make_state, shapes["params"]) if params is None else make_state(params)
    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=0).lower(state, batch)
    return lowered, state, step, labels, time.perf_counter() - start


def abstract(batch: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(np.shape(v), jnp.asarray(v).dtype) for k, v in batch.items()}


def figure(value, goal: str | None = None, **details) -> dict:
    """One named figure of the output JSON: its value, the goal it is held to ("<= 1.0"), whether
    that is met, and what was measured (sizes, raw timings)."""
    out = {"value": None if value is None else float(value), "goal": goal}
    if goal and value is not None:
        op, target = goal.split()
        out["met"] = bool(value <= float(target) if op == "<=" else value >= float(target))
    return {**out, **details}


def skipped(reason: str, goal: str | None = None) -> dict:
    return {"value": None, "goal": goal, "skipped": reason}
