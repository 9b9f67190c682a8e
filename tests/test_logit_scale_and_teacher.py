"""The learnable logit scale/bias live in the dual encoder with each recipe's init, and the
recipe's clamp holds after a real optimizer step; HyCD's teacher (a frozen copy of the dual
encoder's parameters) receives exactly zero gradient."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from valign_jax import hf, losses
from valign_jax.models import DualEncoder


@pytest.mark.parametrize("recipe", ["clip", "siglip", "sail", "lilt"])
def test_preset_init_and_clamp_after_optimizer_step(torch_fixture, recipe):
    path, ref = torch_fixture("clip")
    loaded, params = hf.load_dual_encoder(path)
    preset = losses.LOGIT_SCALE_PRESETS[recipe]
    model = loaded.clone(logit_scale_init=preset.init_log_scale, logit_bias_init=preset.init_bias)
    params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs())["params"]
    assert float(params["logit_scale"]) == pytest.approx(preset.init_log_scale)
    assert ("logit_bias" in params) == (preset.init_bias is not None)

    # Push the log-scale hard upwards (then downwards) with a large-lr optimizer step.
    for direction in (+1.0, -1.0):
        opt = optax.sgd(1e3)
        state = opt.init(params)
        grads = jax.tree_util.tree_map(jnp.zeros_like, params)
        grads["logit_scale"] = jnp.asarray(-direction)
        updates, _ = opt.update(grads, state, params)
        stepped = optax.apply_updates(params, updates)
        clamped = float(losses.clamp_log_scale(stepped["logit_scale"], recipe))
        bound = preset.max_log_scale if direction > 0 else preset.min_log_scale
        if bound is None:
            assert clamped == pytest.approx(float(stepped["logit_scale"]))
        else:
            assert clamped == pytest.approx(bound)
    if recipe == "clip":
        assert math.exp(preset.max_log_scale) == pytest.approx(100.0)


def test_teacher_parameters_get_zero_gradient(torch_fixture):
    path, ref = torch_fixture("clip")
    model, student = hf.load_dual_encoder(path)
    teacher = jax.tree_util.tree_map(lambda x: x * 1.01, student)  # a different frozen copy
    inputs = (ref["pixel_values"], ref["input_ids"][:2], ref["attention_mask"][:2])
    x = ref["pixel_values"]

    def loss(student_params, teacher_params):
        s = model.apply({"params": student_params}, x, *inputs[1:])
        t = model.apply({"params": teacher_params}, x, *inputs[1:])
        return losses.hycd(s["image"], s["text"], t["image"], t["text"])

    g_student, g_teacher = jax.jit(jax.grad(loss, argnums=(0, 1)))(student, teacher)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(g_teacher))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(g_student))
