"""Speed levers are config switches that change nothing numerically beyond dtype tolerance, checked
on the train step a run compiles (train.make_trainer on a tiny demo config): nn.scan over layers,
each remat policy, bf16 compute, the donated state, and fused (cuDNN) attention.

Every comparison runs one step from the same parameters on the same batch with plain SGD at
lr = 1, so the change of each parameter is minus its gradient: equal updates mean equal
gradients. Tower-level checks of scan / remat / bf16 live in test_tower_options.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from benchmarks.common import ClipSizes, clip_batch
from valign_jax import sharding, train
from valign_jax.models import layers
from valign_jax.models.config import TowerConfig
from valign_jax.models.layout import scanned_layer_paths, stack_layers, unstack_layers
from valign_jax.run_setup import build_model

from train_helpers import tiny_config

BATCH = clip_batch(ClipSizes(image_size=32, text_length=16, batch=8))


def lever_config(recipe="clip", **model):
    """The recipe's demo config with SGD at a constant lr of 1 and `model` run options set."""
    config = tiny_config(recipe)
    config.optim.update(name="sgd", b1=0.0, lr=1.0, warmup_init_lr=1.0, end_lr=1.0,
                        warmup_steps=0, grad_clip_norm=0.0)
    config.model.update(model)
    return config


@functools.lru_cache(maxsize=None)
def start_params(recipe):
    """Unrolled starting parameters of the recipe's demo model (host arrays)."""
    model = build_model(lever_config(recipe))
    return jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0),
                                              **model.dummy_inputs())["params"])


def flat(params):
    return {"/".join(k): np.asarray(v, np.float64)
            for k, v in traverse_util.flatten_dict(params).items()}


def run_step(recipe="clip", donate=True, **run_options):
    """(loss, update per parameter in the unrolled layout, state given, new state) of one
    step of the recipe's demo config with `run_options` set on config.model."""
    config = lever_config(recipe, **run_options)
    model = build_model(config)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    trainer = train.make_trainer(config, model, mesh, total_steps=10)
    params = start_params(recipe)
    layer_paths = scanned_layer_paths(model)
    state = trainer.init_state(sharding.put(stack_layers(params, layer_paths), trainer.param_sh))
    step = trainer.train_step if donate else jax.jit(trainer.train_step.__wrapped__)
    new_state, metrics = step(state, sharding.global_batch(BATCH, mesh))
    after = flat(unstack_layers(jax.device_get(new_state.params), layer_paths))
    before = flat(params)
    return float(metrics["loss"]), {k: after[k] - before[k] for k in before}, state, new_state


@functools.lru_cache(maxsize=None)
def reference_step(recipe="clip"):
    """The step with every lever off: unrolled, no remat, float32, XLA attention."""
    loss, update, _, _ = run_step(recipe)
    return loss, update


def assert_same_step(got, want, rtol=1e-4, atol=1e-6):
    (loss, update), (want_loss, want_update) = got, want
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    assert update.keys() == want_update.keys()
    for name in want_update:
        scale = np.abs(want_update[name]).max()
        np.testing.assert_allclose(update[name], want_update[name], rtol=rtol,
                                   atol=atol + rtol * scale, err_msg=name)


def test_scan_layers_gives_the_same_step():
    """config.model.scan_layers=True (one layer traced, weights stacked) gives the unrolled
    step's loss and every parameter's update (compared in the unrolled layout)."""
    loss, update, _, _ = run_step(scan_layers=True)
    assert_same_step((loss, update), reference_step())


@pytest.mark.parametrize("policy", sorted(set(layers.REMAT_POLICIES) - {"none"}))
def test_remat_policy_gives_the_same_step(policy):
    """Each config.model.remat policy recomputes activations in the backward pass and must
    leave the loss and every update as without remat."""
    loss, update, _, _ = run_step(remat=policy)
    assert_same_step((loss, update), reference_step())


def test_bf16_compute_stays_within_dtype_tolerance():
    """config.model.dtype="bfloat16" (8-bit mantissa) keeps parameters float32 and gives the
    float32 step's loss within 2% and an update whose direction agrees to cosine >= 0.99."""
    loss, update, _, new_state = run_step(dtype="bfloat16")
    want_loss, want_update = reference_step()
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new_state.params))
    np.testing.assert_allclose(loss, want_loss, rtol=2e-2)
    got = np.concatenate([update[k].ravel() for k in sorted(update)])
    want = np.concatenate([want_update[k].ravel() for k in sorted(want_update)])
    assert got @ want / np.linalg.norm(got) / np.linalg.norm(want) >= 0.99
    assert not np.array_equal(got, want)  # bf16 really ran


def test_donated_state_gives_the_same_step_and_is_freed():
    """The trainer's step donates the state (its buffers are reused for the new state): the
    given state is deleted afterwards, and the result equals the same step jitted without
    donation, bit for bit."""
    loss, update, given, _ = run_step()
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(given.params))
    kept_loss, kept_update, kept, _ = run_step(donate=False)
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(kept.params))
    assert loss == kept_loss
    for name in update:
        np.testing.assert_array_equal(update[name], kept_update[name], err_msg=name)


def attention_inputs(length, dtype):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, length, 4, 8), dtype) for i in range(3))
    padding = layers.padding_mask(jnp.array([[1] * (length - 3) + [0] * 3, [1] * length]))
    return (q, k, v), {"none": None, "padding": padding,
                       "causal+padding": layers.causal_mask(length) & padding}


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("length", [7, 8])
def test_fused_attention_equals_ours(length, dtype, tol):
    """jax.nn.dot_product_attention (the fused API attention_impl="cudnn" calls, here with
    its XLA implementation) equals our einsum attention for no mask, a padding mask and a
    causal + padding mask; so does the form cuDNN is handed (mask broadcast, an odd length
    padded by one masked token)."""
    (q, k, v), masks = attention_inputs(length, dtype)
    for name, mask in masks.items():
        ours = np.asarray(layers.xla_attention(q, k, v, mask), np.float32)
        for fused in (layers.fused_attention(q, k, v, mask, "xla"),
                      layers.kernel_ready_attention(q, k, v, mask, "xla")):
            assert fused.shape == q.shape, name
            np.testing.assert_allclose(np.asarray(fused, np.float32), ours, atol=tol,
                                       err_msg=name)


@pytest.mark.parametrize("recipe", ["clip", "lilt"])
def test_cudnn_attention_switch_gives_the_same_step(recipe, monkeypatch):
    """config.model.attention_impl="cudnn" reaches every attention layer of both towers
    (CLIP: causal + padding masks, 17-token ViT; LiLT: BERT padding masks) and, with the GPU
    kernel swapped for jax's XLA implementation of the same API (this CPU has no cuDNN), gives
    the reference step."""
    calls = []

    def kernel_on_cpu(q, k, v, mask=None):
        calls.append(q.shape)
        return layers.kernel_ready_attention(q, k, v, mask, "xla")
    monkeypatch.setitem(layers.ATTENTION, "cudnn", kernel_on_cpu)
    model = build_model(lever_config(recipe, attention_impl="cudnn"))
    assert model.image_config.attention_impl == model.text_config.attention_impl == "cudnn"
    loss, update, _, _ = run_step(recipe, attention_impl="cudnn")
    assert calls  # the switch really routed attention through the fused path
    assert_same_step((loss, update), reference_step(recipe))


def test_cudnn_attention_off_gpu_is_a_clear_error(monkeypatch):
    """attention_impl="cudnn" on a CPU fails naming the backend and the fix; on a GPU with a
    float32 tower it fails naming the dtype; an unknown attention_impl is refused up front."""
    (q, k, v), _ = attention_inputs(8, jnp.float32)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU.*'cpu'.*attention_impl='xla'"):
        layers.dot_product_attention(q, k, v, None, "cudnn")
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="bfloat16 or float16.*float32"):
        layers.dot_product_attention(q, k, v, None, "cudnn")
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        TowerConfig(attention_impl="flash")


def test_auto_attention_is_xla_off_gpu_bit_for_bit():
    """attention_impl="auto" (the default) on a CPU is XLA's attention: the same step as
    "xla", bit for bit."""
    loss, update, _, _ = run_step(attention_impl="auto")
    xla_loss, xla_update, _, _ = run_step(attention_impl="xla")
    assert loss == xla_loss
    for name in update:
        np.testing.assert_array_equal(update[name], xla_update[name], err_msg=name)


@pytest.mark.parametrize("dtype,fused", [(jnp.bfloat16, True), (jnp.float16, True),
                                         (jnp.float32, False)])
def test_auto_attention_takes_the_fused_kernel_on_a_gpu_in_half_precision(monkeypatch, dtype,
                                                                          fused):
    """On a GPU backend "auto" routes bf16/fp16 attention through the cuDNN path (here the
    same API on XLA, this CPU having no cuDNN) and float32 through XLA's; the outputs match
    the XLA attention within the dtype's tolerance."""
    calls = []

    def kernel_on_cpu(q, k, v, mask=None):
        calls.append(q.dtype)
        return layers.kernel_ready_attention(q, k, v, mask, "xla")
    monkeypatch.setitem(layers.ATTENTION, "cudnn", kernel_on_cpu)
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    (q, k, v), masks = attention_inputs(9, dtype)
    got = layers.dot_product_attention(q, k, v, masks["padding"], "auto")
    want = layers.xla_attention(q, k, v, masks["padding"])
    assert bool(calls) == fused
    tol = 2e-2 if dtype != jnp.float32 else 1e-6
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)
