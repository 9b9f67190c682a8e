"""Alignment heads: SAIL's GLU ("star") layer equals its formula in NumPy; a dual encoder on
precomputed features (SAIL's cache) trains only its heads and logit parameters."""

import jax
import numpy as np
import pytest

from valign_jax import losses, peft
from valign_jax.models import DualEncoder, FeaturesConfig
from valign_jax.models.layers import GLUHead, MLPHead


def numpy_layer_norm(x, scale, bias, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_glu_head_equals_its_formula():
    x = np.random.RandomState(0).randn(5, 12).astype(np.float32) * 3
    head = GLUHead(features=7)
    params = head.init(jax.random.PRNGKey(0), x)["params"]
    assert params["w1"]["kernel"].shape == (12, 96)  # width factor 8
    assert all(np.all(params[n]["bias"] == 0) for n in ("w1", "w2", "out"))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    h = numpy_layer_norm(x.astype(np.float64), p["norm"]["scale"], p["norm"]["bias"])
    a = np.clip(h @ p["w1"]["kernel"] + p["w1"]["bias"], 0, 6)           # ReLU6
    b = h @ p["w2"]["kernel"] + p["w2"]["bias"]
    expected = np.clip(a * b, -1e3, 1e3) @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(head.apply({"params": params}, x), expected, rtol=1e-4, atol=1e-5)
    # clamping: huge inputs stay finite
    big = head.apply({"params": params}, x * 1e6)
    assert np.all(np.isfinite(np.asarray(big)))


def test_mlp_head_shape():
    x = np.ones((3, 10), np.float32)
    head = MLPHead(features=4)
    params = head.init(jax.random.PRNGKey(0), x)["params"]
    assert params["fc1"]["kernel"].shape == (10, 40)
    assert head.apply({"params": params}, x).shape == (3, 4)


def test_features_dual_encoder_trains_only_heads():
    preset = losses.LOGIT_SCALE_PRESETS["sail"]
    model = DualEncoder(FeaturesConfig(24, "image"), FeaturesConfig(16, "text"),
                        projection_dim=8, image_head="glu", text_head="glu",
                        logit_scale_init=preset.init_log_scale, logit_bias_init=preset.init_bias)
    params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs(2))["params"]
    assert set(params) == {"visual_projection", "text_projection", "logit_scale", "logit_bias"}
    labels = peft.make_labels(params, "heads_only")
    assert peft.count(params, labels)[0] == peft.count(params)[1]
    out = model.apply({"params": params}, np.ones((2, 24), np.float32),
                      np.ones((2, 16), np.float32))
    assert out["image"].shape == out["text"].shape == (2, 8)
    with pytest.raises(ValueError, match="width 20; the config says 24"):
        model.apply({"params": params}, np.ones((2, 20), np.float32), np.ones((2, 16), np.float32))
