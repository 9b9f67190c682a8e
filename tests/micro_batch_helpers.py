"""Shared by the gradient-caching tests (tests/test_micro_batches.py and its 8-device child):
train steps of a demo config through the trainer a run builds, with `config.micro_batches` = 1
(the reference: the whole batch at once) or k, and how far two such steps are apart.

A `Steps` holds one model (a recipe's tiny demo towers and a logit preset), its initial
parameters and one batch of the demo's own synthetic data (second captions included), and runs
one step from there for any objective and k. The gradients are read from the real step's
output: after one AdamW step from a fresh state the first moment is (1 − b1) · gradient.
"""

import jax
import numpy as np

from valign_jax import sharding, train
from valign_jax.data import pipeline
from valign_jax.recipes import load_config
from valign_jax.run_setup import build_model, initial_params, input_setup

from conftest import REPO

OBJECTIVES = {
    "softmax": {},
    "sigmoid_batch": {"objective.kind": "sigmoid"},
    "sigmoid_pairs": {"objective.kind": "sigmoid", "objective.norm": "pairs"},
    "multi_positive": {"objective.kind": "sigmoid", "objective.norm": "pairs",
                       "objective.multi_positive": True},
    # all three terms weighted, so RaFA's draw and HyCD's teacher both matter
    "clip_refine": {"objective.kind": "clip_refine",
                    "objective.clip_refine.weights": (1.0, 1.0, 1.0)},
}
# PEFT recipe: (recipe file, its argument); lilt_lwa trains adapters and LayerNorms only.
RECIPES = {"full": ("clip", "demo"), "lilt_lwa": ("lilt", "lilt_lwa,demo")}


def logit_preset(objective: str):
    """Sigmoid objectives need a logit bias (SigLIP's preset); the others keep the recipe's."""
    return "siglip" if OBJECTIVES[objective].get("objective.kind") == "sigmoid" else None


def case_config(objective: str, recipe: str, batch_size: int, micro_batches: int = 1,
                **changes):
    name, arg = RECIPES[recipe]
    config = load_config(f"{REPO}/configs/{name}.py:{arg}")
    preset = logit_preset(objective)
    config.update_from_flattened_dict({
        **OBJECTIVES[objective], **({"model.logit_preset": preset} if preset else {}),
        "batch_size": batch_size, "micro_batches": micro_batches,
        "data.num_train": 4 * batch_size, **changes})
    return config


class Steps:
    """One model, its initial parameters and one batch, for `recipe` and the logit preset
    `objective` needs; `step` trains one step of any objective with that preset."""

    def __init__(self, objective: str, recipe: str, batch_size: int, mesh, **changes):
        self.recipe, self.batch_size, self.mesh, self.changes = recipe, batch_size, mesh, changes
        config = case_config(objective, recipe, batch_size, **changes)
        self.preset = config.model.logit_preset
        self.model = build_model(config)
        image_size, collate = input_setup(config, self.model, second_caption=True)
        source = pipeline.make_source(config.data.train, "train", config.data, image_size,
                                      "config.data.train")
        batch = next(iter(pipeline.train_dataset(source, collate, batch_size, config.seed)))
        self.batch = {k: v for k, v in batch.items() if k != "skipped"}
        self.params = None

    def step(self, objective: str, micro_batches: int = 1, **changes) -> dict:
        """One train step from the initial parameters: the loss, the metrics, the gradients of
        the trainable parameters and the parameters before and after, as NumPy."""
        config = case_config(objective, self.recipe, self.batch_size, micro_batches,
                             **{**self.changes, **changes})
        assert config.model.logit_preset == self.preset, (objective, self.preset)
        trainer = train.make_trainer(config, self.model, self.mesh, total_steps=10)
        if self.params is None:
            self.params = jax.block_until_ready(
                initial_params(config, self.model, trainer.param_sh))
        params, args = jax.tree.map(lambda p: p.copy(), self.params), ()  # the step donates
        if trainer.needs_teacher:  # a teacher that differs from the student: HyCD has work
            noise = jax.random.PRNGKey(5)
            args = (jax.tree.map(lambda p: p + 0.02 * jax.random.normal(noise, p.shape),
                                 params),)
        # One program in flight at a time: on a loaded 2-core machine, simulated devices
        # running two programs' collectives at once can starve each other's rendezvous.
        state = jax.block_until_ready(trainer.init_state(params))
        inputs = jax.block_until_ready((sharding.global_batch(self.batch, self.mesh), *args))
        state, metrics = jax.block_until_ready(trainer.train_step(state, *inputs))
        b1 = config.optim.b1
        return {"loss": float(metrics["loss"]),
                "metrics": {k: float(v) for k, v in metrics.items()},
                "grads": {name: value / (1 - b1) for name, value in flat(state.opt_state).items()
                          if "/mu/" in f"/{name}/"},
                "before": flat(self.params), "after": flat(state.params),
                "fsdp_split": sum("fsdp" in str(leaf.sharding.spec)
                                  for leaf in jax.tree.leaves(state.params))}


def flat(tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path):
            np.asarray(v) for path, v in leaves if np.asarray(v).dtype.kind == "f"}


def distances(reference: dict, other: dict) -> dict:
    """How far `other`'s step is from `reference`'s, relative (float32 noise is ~1e-7–1e-6):
    loss: |Δ| / |loss|;
    grads: ‖Δg‖ / ‖g‖ over all trainable parameters;
    grads_worst_array: the largest over parameter arrays of ‖Δg‖ / max(‖g‖, 10⁻³ · the largest
        array's ‖g‖): no array is wrong (one missing a micro-batch would be off by ~1/k, a
        scalar counted once per micro-batch by k − 1). The floor is for arrays whose gradient
        is a thousand times smaller than the largest (the attention keys' bias, zero in exact
        arithmetic; queries and keys at initialisation): their float32 noise is not signal;
    params: ‖Δθ‖ / ‖θ‖ over all parameters after the update. (Per array this would measure
        AdamW's first step, which divides each gradient entry by its own magnitude: an entry
        near ε = 1e-8 moves its parameter by up to lr on float noise alone.)
    params_vs_update: ‖Δθ‖ / ‖θ_after − θ_before‖: the difference against the update itself;
    metrics: the largest |Δ| / max(1, |value|) of the logged metrics (accuracies, mean
        logits, a loss's terms) but loss and gradient norm."""
    g_ref, g_other = reference["grads"], other["grads"]
    assert sorted(g_ref) == sorted(g_other) and g_ref
    norm = lambda arrays: float(np.sqrt(sum(np.sum(np.square(a)) for a in arrays)))
    floor = 1e-3 * max(np.linalg.norm(g) for g in g_ref.values())
    worst = max(np.linalg.norm(g_other[k] - g) / max(np.linalg.norm(g), floor)
                for k, g in g_ref.items())
    names = sorted(reference["after"])
    after, before = reference["after"], reference["before"]
    moved = norm(other["after"][k] - after[k] for k in names)
    metrics = [k for k in reference["metrics"] if k not in ("loss", "grad_norm")]
    assert metrics and sorted(metrics) == sorted(k for k in other["metrics"]
                                                 if k not in ("loss", "grad_norm"))
    return {"loss": abs(other["loss"] - reference["loss"]) / abs(reference["loss"]),
            "grads": norm(g_other[k] - g for k, g in g_ref.items()) / norm(g_ref.values()),
            "grads_worst_array": float(worst),
            "params": moved / norm(after.values()),
            "params_vs_update": moved / norm(after[k] - before[k] for k in names),
            "metrics": max(abs(other["metrics"][k] - reference["metrics"][k])
                           / max(1.0, abs(reference["metrics"][k])) for k in metrics),
            "trainable_arrays": len(g_ref)}


def assert_same_step(d: dict, tolerance: float = 1e-5):
    """The micro-batched step is the whole batch's step: loss, gradients and updated
    parameters within `tolerance` (relative, float32), no gradient array off by more than
    10 × that, the difference a thousandth of the update or less, the same logged metrics."""
    assert d["loss"] <= tolerance, d
    assert d["grads"] <= tolerance, d
    assert d["grads_worst_array"] <= 10 * tolerance, d
    assert d["params"] <= tolerance, d
    assert d["params_vs_update"] <= 1e-3, d
    assert d["metrics"] <= 1e-5, d
