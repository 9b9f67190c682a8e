"""CLIP-Refine inside the train step: RaFA's references are drawn from the step's rng (fresh each
step, shared by image and text), HyCD reads a frozen teacher passed to the step, and the step's
loss equals the losses module applied to the same features by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from valign_jax import losses, optim, peft
from valign_jax.models import DualEncoder
from valign_jax.models.registry import preset
from valign_jax.objectives import clip_refine_objective
from valign_jax.train_step import create_state, make_train_step

OPTIM = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, warmup_init_lr=1e-3, end_lr=1e-3,
                                       warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                                       weight_decay=0.1, grad_clip_norm=0.0))


def setup():
    model = DualEncoder(preset("clip_tiny_vision"), preset("clip_tiny_text"), projection_dim=32)
    params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs())["params"]
    rng = np.random.RandomState(0)
    batch = {"pixel_values": rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
             "input_ids": rng.randint(4, 500, (4, 8)).astype(np.int32),
             "attention_mask": np.ones((4, 8), np.int32)}
    batch["input_ids"][:, -1] = 3  # eos
    return model, params, batch


def test_clip_refine_step_matches_hand_computed_loss_and_keeps_teacher():
    model, params, batch = setup()
    teacher = jax.tree_util.tree_map(jnp.copy, params)
    labels = peft.make_labels(params, "full")
    optimizer = optim.make_optimizer(OPTIM, labels, total_steps=3)
    state = create_state(params, optimizer, jax.random.PRNGKey(7))
    step = jax.jit(make_train_step(model, optimizer, labels, clip_refine_objective(), "clip"))

    # By hand: the step splits its rng once and draws the references from the second half.
    _, step_rng = jax.random.split(state.rng)
    out = model.apply({"params": params}, batch["pixel_values"], batch["input_ids"],
                      batch["attention_mask"])
    ref = losses.sample_rafa_reference(step_rng, 4, 32)
    expected = (losses.rafa(out["image"], out["text"], ref)
                + losses.hycd(out["image"], out["text"], out["image"], out["text"]))

    new_state, metrics = step(state, batch, teacher)
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
    second_state, second = step(new_state, batch, teacher)
    # fresh references each step: the RaFA term moves even where the features barely did
    assert float(second["loss_rafa"]) != float(metrics["loss_rafa"])
    # the teacher is an input, not state: untouched, and not in the optimizer state
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(teacher),
                                                     jax.tree_util.tree_leaves(params)))
    assert jax.tree_util.tree_structure(second_state.params) == jax.tree_util.tree_structure(params)
    # with alpha = 0.5 HyCD is not zero at student == teacher (its target mixes in the identity);
    # the step descends it
    assert float(second["loss_hycd"]) < float(metrics["loss_hycd"])
