"""DINOv2 (HF model_type "dinov2") as a ViTTower with a DINOv2Config: Flax msgpack and PyTorch-layout
safetensors load and match HF, SAIL's "cls_mean" pooling (the default) is concat[CLS, mean of
patches] of the final-LayerNorm output, scan_layers matches, save_tower loads back in transformers.

The reference at image sizes other than the checkpoint's is HF's *PyTorch* Dinov2Model (bicubic,
A=-0.75, to the exact grid); HF's Flax model resizes differently (jax bicubic with a +0.1 offset on
the scale), so at those sizes it is no reference. Without torch, the PyTorch outputs come from the
committed fixtures (tests/fixtures/make_torch_fixtures.py)."""

import json

import jax
import numpy as np
import pytest
import transformers as tf
from flax import traverse_util

from valign_jax import hf, peft
from valign_jax.models import DINOv2Config, DualEncoder
from valign_jax.models.registry import preset
from valign_jax.models.layout import abstract_params
from valign_jax.models.registry import dummy_inputs, tower_for
from tiny_hf import nchw, pixels

TOL = 1e-5
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
             image_size=28, patch_size=7)


def max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def cls_mean(hidden):
    hidden = np.asarray(hidden)
    return np.concatenate([hidden[:, 0], hidden[:, 1:].mean(1)], axis=-1)


def randomised(params, seed):
    """LayerScale, LayerNorms, biases and the mask token moved off their ones/zeros inits."""
    rng = np.random.RandomState(seed)
    moved = ("lambda1", "scale", "bias", "mask_token")
    return traverse_util.unflatten_dict({
        k: np.asarray(v) + (rng.normal(0, 0.3, v.shape).astype(np.float32) if k[-1] in moved
                            else 0)
        for k, v in traverse_util.flatten_dict(params).items()})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random FlaxDinov2Model checkpoints (flax_model.msgpack) and the models that wrote them.
    layerscale_value stays 1.0: HF's Flax LayerScale multiplies lambda1 by it twice more, unlike
    HF's PyTorch model (and valign_jax), which use the stored lambda1 as is."""
    root = tmp_path_factory.mktemp("dinov2")
    models = {"mlp": tf.FlaxDinov2Model(tf.Dinov2Config(**SHAPE), seed=1),
              "swiglu": tf.FlaxDinov2Model(tf.Dinov2Config(**SHAPE, use_swiglu_ffn=True), seed=2)}
    for name, model in models.items():
        model.params = randomised(model.params, seed=3)
        model.save_pretrained(root / name)
        assert (root / name / "flax_model.msgpack").is_file()
    return root, models


@pytest.mark.parametrize("name", ["mlp", "swiglu"])
def test_flax_checkpoint_matches_hf(checkpoints, name):
    root, models = checkpoints
    x = pixels(side=28)
    ref = models[name](nchw(x))
    tower, params = hf.load_tower(root / name)
    assert isinstance(tower.config, DINOv2Config) and tower.config.pooling_mode == "cls_mean"
    out = tower.apply({"params": params}, x)
    assert max_diff(out["last_hidden_state"], ref.last_hidden_state) <= TOL
    assert out["pooled"].shape == (2, 2 * 32)
    assert max_diff(out["pooled"], cls_mean(ref.last_hidden_state)) <= TOL
    for pooling, expected in [("cls", ref.pooler_output),
                              ("mean", np.asarray(ref.last_hidden_state)[:, 1:].mean(1))]:
        other = tower.clone(config=tower.config.replace(pooling=pooling))
        assert max_diff(other.apply({"params": params}, x)["pooled"], expected) <= TOL


@pytest.mark.parametrize("name", ["mlp", "swiglu"])
def test_scan_layers_matches(checkpoints, name):
    root, _ = checkpoints
    x = pixels(side=42)  # interpolated positions too
    tower, params = hf.load_tower(root / name)
    scanned, scanned_params = hf.load_tower(root / name, scan_layers=True)
    stacked = scanned_params["encoder"]["layer"]
    assert "0" not in stacked and stacked["layer_scale1"]["lambda1"].shape == (2, 32)
    a = tower.apply({"params": params}, x)
    b = scanned.apply({"params": scanned_params}, x)
    assert max_diff(a["last_hidden_state"], b["last_hidden_state"]) <= TOL
    assert max_diff(a["pooled"], b["pooled"]) <= TOL


@pytest.mark.parametrize("name", ["mlp", "swiglu"])
def test_flax_checkpoint_at_other_sizes_matches_pytorch(checkpoints, name):
    """The Flax weights in HF's PyTorch Dinov2Model, which interpolates positions to any size."""
    torch = pytest.importorskip("torch")
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model
    root, models = checkpoints
    # (from_pretrained(..., from_flax=True) leaves meta tensors in transformers 4.57)
    pt = load_flax_weights_in_pytorch_model(tf.Dinov2Model(models[name].config),
                                            models[name].params).eval()
    tower, params = hf.load_tower(root / name)
    for height, width in [(28, 28), (42, 42), (35, 35), (21, 49)]:
        x = np.random.RandomState(height * width).uniform(-1, 1, (2, height, width, 3)).astype(
            np.float32)
        with torch.no_grad():
            ref = pt(torch.from_numpy(nchw(x).copy())).last_hidden_state.numpy()
        out = tower.apply({"params": params}, x)
        assert out["last_hidden_state"].shape[1] == 1 + (height // 7) * (width // 7)
        assert max_diff(out["last_hidden_state"], ref) <= TOL
        assert max_diff(out["pooled"], cls_mean(ref)) <= TOL


def test_pytorch_fixture(torch_fixture):
    """model.safetensors written by Dinov2Model (PyTorch layout, layerscale_value 0.1, lambda1
    randomised): native size, 42 px and 21x49 px (interpolated), masked patches."""
    path, ref = torch_fixture("dinov2")
    tower, params = hf.load_tower(path)
    assert params["embeddings"]["position_embeddings"].shape == (1, 17, 32)
    out = tower.apply({"params": params}, ref["pixel_values"])
    assert max_diff(out["last_hidden_state"], ref["last_hidden_state"]) <= TOL
    assert max_diff(out["pooled"], cls_mean(ref["last_hidden_state"])) <= TOL
    assert max_diff(out["last_hidden_state"][:, 0], ref["pooler_output"]) <= TOL
    for size in ("42", "21x49"):
        out = tower.apply({"params": params}, ref[f"pixel_values_{size}"])
        assert max_diff(out["last_hidden_state"], ref[f"last_hidden_state_{size}"]) <= TOL
        assert max_diff(out["pooled"], cls_mean(ref[f"last_hidden_state_{size}"])) <= TOL
    out = tower.apply({"params": params}, ref["pixel_values"],
                      bool_masked_pos=ref["bool_masked_pos"])
    assert max_diff(out["last_hidden_state"], ref["last_hidden_state_masked"]) <= TOL
    # scanned, and with the position table resized at load (image_size override)
    scanned, scanned_params = hf.load_tower(path, scan_layers=True, image_size=42)
    assert scanned_params["embeddings"]["position_embeddings"].shape == (1, 37, 32)
    out = scanned.apply({"params": scanned_params}, ref["pixel_values_42"])
    assert max_diff(out["last_hidden_state"], ref["last_hidden_state_42"]) <= TOL


def test_pytorch_fixture_swiglu_classifier(torch_fixture):
    path, ref = torch_fixture("dinov2_swiglu_classifier")  # "dinov2." prefix, SwiGLU MLP
    tower, params = hf.load_tower(path, pooling="cls")
    assert tower.config.use_swiglu_ffn
    assert params["encoder"]["layer"]["0"]["mlp"]["weights_in"]["kernel"].shape == (32, 2 * 48)
    out = tower.apply({"params": params}, ref["pixel_values"])
    assert max_diff(out["last_hidden_state"], ref["last_hidden_state"]) <= TOL
    assert max_diff(out["pooled"], ref["last_hidden_state"][:, 0]) <= TOL


@pytest.mark.parametrize("scan", [False, True])
def test_save_tower_loads_in_transformers(torch_fixture, tmp_path, scan):
    path, ref = torch_fixture("dinov2")
    tower, params = hf.load_tower(path, scan_layers=scan)
    hf.save_tower(tower, params, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "dinov2" and config["architectures"] == ["Dinov2Model"]
    assert "intermediate_size" not in config and config["layerscale_value"] == 0.1
    # HF's Flax LayerScale re-applies layerscale_value (see `checkpoints`): compare at 1.0, which
    # only changes lambda1's init, not the network our params define.
    config["layerscale_value"] = 1.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = tf.FlaxDinov2Model.from_pretrained(tmp_path)
    x = ref["pixel_values"]
    ours = tower.apply({"params": params}, x)
    assert max_diff(reloaded(nchw(x)).last_hidden_state, ours["last_hidden_state"]) <= TOL
    assert max_diff(ours["last_hidden_state"], ref["last_hidden_state"]) <= TOL
    # our loader reads the PyTorch-layout safetensors we wrote back to the same params
    (tmp_path / "flax_model.msgpack").unlink()
    _, again = hf.load_tower(tmp_path, scan_layers=scan)
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                  params, again)
    assert all(jax.tree_util.tree_leaves(same))


def test_saved_safetensors_load_in_pytorch(checkpoints, tmp_path):
    torch = pytest.importorskip("torch")
    root, _ = checkpoints
    tower, params = hf.load_tower(root / "swiglu")
    hf.save_tower(tower, params, tmp_path, formats=("safetensors",))
    pt = tf.Dinov2Model.from_pretrained(tmp_path).eval()
    for side in (28, 42):
        x = pixels(side=side)
        with torch.no_grad():
            ref = pt(torch.from_numpy(nchw(x).copy())).last_hidden_state.numpy()
        assert max_diff(tower.apply({"params": params}, x)["last_hidden_state"], ref) <= TOL


def test_unsupported_options_name_the_key(tmp_path, torch_fixture):
    with pytest.raises(ValueError, match="hidden_act='gelu_fast'"):
        DINOv2Config(hidden_act="gelu_fast")
    with pytest.raises(ValueError, match="add_pooling_layer"):
        DINOv2Config(add_pooling_layer=True)
    with pytest.raises(ValueError, match="pooling='pooler'"):
        DINOv2Config(pooling="pooler")
    with pytest.raises(ValueError, match="intermediate_size=3072.*mlp_ratio"):
        DINOv2Config(intermediate_size=3072, hidden_size=768, mlp_ratio=2)
    DINOv2Config(intermediate_size=3072, hidden_size=768)  # consistent with mlp_ratio 4: fine
    with pytest.raises(ValueError, match="bool_masked_pos"):
        tower = tower_for(preset("vit_tiny"))
        x = np.zeros((1, 32, 32, 3), np.float32)
        tower.init(jax.random.PRNGKey(0), x, bool_masked_pos=np.zeros((1, 16), bool))
    # a checkpoint whose config.json holds a non-square patch size
    path, _ = torch_fixture("dinov2")
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "patch_size": [7, 14]}))
    with pytest.raises(ValueError, match=r"patch_size=\[7, 14\]"):
        hf.load_tower(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config,
                                                      "model_type": "dinov2_with_registers"}))
    with pytest.raises(ValueError, match="dinov2_with_registers"):
        hf.load_tower(tmp_path)


@pytest.mark.parametrize("name,count", [("dinov2_s14", 22_056_576), ("dinov2_b14", 86_580_480),
                                        ("dinov2_l14", 304_368_640)])
def test_presets_have_the_published_shapes(name, count):
    """Parameter counts of HF's Dinov2Model for facebook/dinov2-small|base|large."""
    config = preset(name)
    assert (config.image_size, config.patch_size, config.layer_norm_eps) == (518, 14, 1e-6)
    assert config.to_hf()["model_type"] == "dinov2"
    shapes = abstract_params(tower_for(config), **dummy_inputs(config))
    assert sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes)) == count
    assert shapes["embeddings"]["position_embeddings"].shape == (1, 1 + 37 * 37,
                                                                 config.hidden_size)


def test_tiny_preset_in_a_dual_encoder_and_peft_ln():
    """dinov2_tiny trains in a dual encoder (2·D-wide cls_mean features into the head); the `ln`
    part unlocks exactly the LayerNorms: norm1, norm2 of every layer and the final layernorm."""
    model = DualEncoder(preset("dinov2_tiny"), preset("bert_tiny"), projection_dim=16)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), **model.dummy_inputs(2))["params"]
    assert params["visual_projection"]["kernel"].shape == (2 * 64, 16)
    out = model.apply({"params": params}, **model.dummy_inputs(2))
    assert out["image"].shape == (2, 16)
    labels = peft.make_labels(params, peft.Recipe(image=("ln",), heads=False, logit=False))
    trainable = sorted("/".join(p) for p, label in traverse_util.flatten_dict(labels).items()
                       if label == peft.TRAINABLE)
    norms = [f"encoder/layer/{i}/{n}" for i in range(2) for n in ("norm1", "norm2")] + ["layernorm"]
    assert trainable == sorted(f"vision_model/{n}/{leaf}" for n in norms
                               for leaf in ("scale", "bias"))
