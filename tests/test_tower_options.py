"""Run options change nothing but speed and memory: nn.scan over layers equals the unrolled tower,
remat gives the same gradients, bf16 compute stays close to fp32; position-embedding interpolation
equals an independent NumPy bicubic (PyTorch's kernel, A = -0.75)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valign_jax import hf
from valign_jax.models.layers import interpolate_patch_positions


def leaves_equal(a, b):
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def inputs_for(tower, torch_ref):
    if "input_ids" in torch_ref:
        return (torch_ref["input_ids"], torch_ref["attention_mask"])
    return (torch_ref["pixel_values"],)


@pytest.mark.parametrize("name", ["bert", "vit", "clip_text", "clip_vision"])
def test_scan_equals_unrolled_and_round_trips(torch_fixture, tmp_path, name):
    path, ref = torch_fixture(name)
    tower, params = hf.load_tower(path)
    scanned, scanned_params = hf.load_tower(path, scan_layers=True)
    layer_path = tower.LAYER_PATHS[0]
    stacked = scanned_params[layer_path[0]][layer_path[1]]
    assert "0" not in stacked  # weights carry a leading layer axis instead
    assert jax.tree_util.tree_leaves(stacked)[0].shape[0] == tower.config.num_hidden_layers
    args = inputs_for(tower, ref)
    a = tower.apply({"params": params}, *args)
    b = scanned.apply({"params": scanned_params}, *args)
    np.testing.assert_allclose(a["last_hidden_state"], b["last_hidden_state"], atol=1e-5)
    # saving a scanned tower writes the HF (unrolled) layout
    hf.save_tower(scanned, scanned_params, tmp_path, formats=("safetensors",))
    assert leaves_equal(hf.load_tower(tmp_path)[1], params)


def test_remat_gives_the_same_gradients(torch_fixture):
    path, ref = torch_fixture("clip")
    grads = {}
    for remat, scan in [("none", False), ("full", False), ("dots", True)]:
        model, params = hf.load_dual_encoder(path, remat=remat, scan_layers=scan)

        def loss(p):
            out = model.apply({"params": p}, ref["pixel_values"], ref["input_ids"],
                              ref["attention_mask"])
            return jnp.sum(out["image"] @ out["text"].T) * out["logit_scale"]
        g = jax.jit(jax.grad(loss))(params)
        if scan:  # compare in the unrolled layout
            from valign_jax.models.layout import scanned_layer_paths, unstack_layers
            g = unstack_layers(g, scanned_layer_paths(model))
        grads[remat] = g
    for key in ("full", "dots"):
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=5e-5, rtol=1e-4),
                               grads["none"], grads[key])


@pytest.mark.parametrize("name", ["bert", "vit", "clip_text", "clip_vision"])
def test_bf16_compute_stays_close_to_fp32(torch_fixture, name):
    """bf16 keeps 8 bits of mantissa (~0.4% per rounding): after two layers the pooled features
    must agree with fp32 to cosine >= 0.999 and to 0.1 absolute on LayerNorm-scale values."""
    path, ref = torch_fixture(name)
    tower, params = hf.load_tower(path)
    bf16, bf16_params = hf.load_tower(path, dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(bf16_params))
    args = inputs_for(tower, ref)
    a = np.asarray(tower.apply({"params": params}, *args)["pooled"], np.float64)
    out = bf16.apply({"params": bf16_params}, *args)["pooled"]
    assert out.dtype == jnp.bfloat16
    b = np.asarray(out.astype(jnp.float32), np.float64)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() >= 0.999
    assert np.abs(a - b).max() <= 0.1


def numpy_bicubic(image, out_h, out_w, a=-0.75):
    """Pointwise 2-D bicubic resize of (H, W, D) as PyTorch's interpolate(mode='bicubic',
    align_corners=False) defines it: each output pixel sums a 4x4 neighbourhood, indices clamped."""
    def kernel(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0
    h, w, _ = image.shape
    out = np.zeros((out_h, out_w, image.shape[2]))
    for y in range(out_h):
        sy = (y + 0.5) * h / out_h - 0.5
        for x in range(out_w):
            sx = (x + 0.5) * w / out_w - 0.5
            for i in range(math.floor(sy) - 1, math.floor(sy) + 3):
                for j in range(math.floor(sx) - 1, math.floor(sx) + 3):
                    weight = kernel(sy - i) * kernel(sx - j)
                    out[y, x] += weight * image[min(max(i, 0), h - 1), min(max(j, 0), w - 1)]
    return out


@pytest.mark.parametrize("side,grid", [(4, (6, 6)), (6, (4, 4)), (4, (5, 7)), (14, (16, 16))])
def test_position_interpolation_matches_numpy_bicubic(side, grid):
    table = np.random.RandomState(side).randn(side * side, 3).astype(np.float32)
    ours = np.asarray(interpolate_patch_positions(jnp.asarray(table), grid))
    ref = numpy_bicubic(table.reshape(side, side, 3).astype(np.float64), *grid)
    np.testing.assert_allclose(ours, ref.reshape(-1, 3), atol=1e-5)


def test_vit_224_checkpoint_runs_at_256():
    """A 224-px / patch-16 ViT (as LiLT's DeiT-B) run at 256 px equals the same network built for
    256 px whose 16x16 position table was resized by the independent NumPy bicubic above."""
    from valign_jax.models import ViTConfig, ViTTower
    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, image_size=224, patch_size=16)
    tower = ViTTower(config)
    params = jax.jit(tower.init)(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]
    x = np.random.RandomState(0).uniform(-1, 1, (2, 256, 256, 3)).astype(np.float32)
    out = jax.jit(tower.apply)({"params": params}, x)["last_hidden_state"]
    assert out.shape == (2, 1 + 16 * 16, 16)

    table = np.asarray(params["embeddings"]["position_embeddings"][0], np.float64)
    resized = numpy_bicubic(table[1:].reshape(14, 14, 16), 16, 16).reshape(256, 16)
    params256 = jax.tree_util.tree_map(lambda a: a, params)
    params256["embeddings"] = {**params["embeddings"], "position_embeddings": jnp.asarray(
        np.concatenate([table[:1], resized])[None], jnp.float32)}
    reference = jax.jit(ViTTower(config.replace(image_size=256)).apply)({"params": params256}, x)
    np.testing.assert_allclose(out, reference["last_hidden_state"], atol=1e-5)
