"""Checkpoints written by transformers' Flax classes (flax_model.msgpack) load through hf.load_*
and match those classes' outputs; hf.save_tower / save_dual_encoder output loads back into
transformers (Flax classes here, PyTorch classes where torch is installed) with the same outputs."""

import copy

import jax
import numpy as np
import pytest
import transformers as tf

from valign_jax import hf
from tiny_hf import bert_config, clip_config, nchw, pixels, text_inputs, vit_config

TOL = 1e-5


def max_diff(a, b, mask=None):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(diff[mask.astype(bool)].max() if mask is not None else diff.max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random Flax checkpoints saved with save_pretrained, and the models that wrote them."""
    root = tmp_path_factory.mktemp("flax_ckpts")
    models = {
        "bert": tf.FlaxBertModel(bert_config(), seed=1),
        "vit": tf.FlaxViTModel(vit_config(), seed=2),
        "clip": tf.FlaxCLIPModel(clip_config(), seed=3),
        "clip_legacy_eos": tf.FlaxCLIPModel(clip_config(eos_token_id=2), seed=4),
        "clip_text": tf.FlaxCLIPTextModel(clip_config().text_config, seed=5),
        "clip_vision": tf.FlaxCLIPVisionModel(clip_config().vision_config, seed=6),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        assert (root / name / "flax_model.msgpack").is_file()
    return root, models


def test_bert(checkpoints):
    root, models = checkpoints
    ids, mask = text_inputs()
    ref = models["bert"](ids, attention_mask=mask)
    for pooling, ref_pooled in [("pooler", ref.pooler_output),
                                ("cls", ref.last_hidden_state[:, 0])]:
        tower, params = hf.load_tower(root / "bert", pooling=pooling)
        out = tower.apply({"params": params}, ids, mask)
        assert max_diff(out["last_hidden_state"], ref.last_hidden_state, mask) <= TOL
        assert max_diff(out["pooled"], ref_pooled) <= TOL
    # mean pooling averages real tokens only
    tower, params = hf.load_tower(root / "bert", pooling="mean")
    out = tower.apply({"params": params}, ids, mask)
    h = np.asarray(ref.last_hidden_state)
    expected = np.stack([h[i][mask[i].astype(bool)].mean(0) for i in range(len(ids))])
    assert max_diff(out["pooled"], expected) <= TOL


def test_vit_poolings(checkpoints):
    root, models = checkpoints
    x = pixels()
    ref = models["vit"](nchw(x))
    h = np.asarray(ref.last_hidden_state)
    expected = {"pooler": ref.pooler_output, "cls": h[:, 0], "mean": h[:, 1:].mean(1),
                "cls_mean": np.concatenate([h[:, 0], h[:, 1:].mean(1)], -1)}
    for pooling, pooled in expected.items():
        tower, params = hf.load_tower(root / "vit", pooling=pooling)
        out = tower.apply({"params": params}, x)
        assert max_diff(out["last_hidden_state"], h) <= TOL
        assert max_diff(out["pooled"], pooled) <= TOL


def hf_text_model(clip_model, **config_changes):
    """transformers' Flax CLIP text model holding `clip_model`'s text weights."""
    config = copy.deepcopy(clip_model.config.text_config)
    for key, value in config_changes.items():
        setattr(config, key, value)
    return tf.FlaxCLIPTextModel(config, _do_init=False), {
        "text_model": clip_model.params["text_model"]}


@pytest.mark.parametrize("name", ["clip", "clip_legacy_eos"])
def test_clip_dual_encoder_and_parts(checkpoints, name):
    root, models = checkpoints
    ref_model = models[name]
    ids, mask = text_inputs(eos=98)  # 98 is also the largest id, as OpenAI's EOT is
    x = pixels()
    model, params = hf.load_dual_encoder(root / name)
    variables = {"params": params}
    assert max_diff(model.apply(variables, x, method=model.encode_image),
                    ref_model.get_image_features(nchw(x))) <= TOL
    assert max_diff(model.apply(variables, ids, mask, method=model.encode_text),
                    ref_model.get_text_features(ids, mask)) <= TOL
    assert float(params["logit_scale"]) == pytest.approx(float(ref_model.params["logit_scale"]))

    text, text_params = hf.load_tower(root / name, part="text")
    assert text.config.eos_token_id == ref_model.config.text_config.eos_token_id
    ref_text, ref_params = hf_text_model(ref_model)
    ref = ref_text(ids, mask, params=ref_params)
    out = text.apply({"params": text_params}, ids, mask)
    assert max_diff(out["last_hidden_state"], ref.last_hidden_state, mask) <= TOL
    assert max_diff(out["pooled"], ref.pooler_output) <= TOL


def test_eos_conventions_differ_when_eos_is_not_the_max_id(checkpoints):
    """Row 2 holds eos (50) at position 4 but a larger id later: the legacy rule (eos_token_id 2:
    argmax of ids) and the eos_token_id rule pick different tokens, each matching HF's."""
    root, models = checkpoints
    ids, mask = text_inputs(eos=50)
    ids[2, 6] = 97
    assert np.argmax(ids[2]) != np.argmax(ids[2] == 50)
    text, params = hf.load_tower(root / "clip", part="text")
    pooled = {}
    for eos in (50, 2):
        ref_text, ref_params = hf_text_model(models["clip"], eos_token_id=eos)
        ref = ref_text(ids, mask, params=ref_params)
        out = text.clone(config=text.config.replace(eos_token_id=eos)).apply(
            {"params": params}, ids, mask)
        assert max_diff(out["pooled"], ref.pooler_output) <= TOL
        pooled[eos] = np.asarray(out["pooled"])
    assert max_diff(pooled[50][2], pooled[2][2]) > 1e-3  # the two rules really differ here


@pytest.mark.parametrize("name,cls", [("clip_text", "FlaxCLIPTextModel"),
                                      ("clip_vision", "FlaxCLIPVisionModel")])
def test_standalone_clip_towers(checkpoints, name, cls):
    root, models = checkpoints
    tower, params = hf.load_tower(root / name)
    if name == "clip_text":
        ids, mask = text_inputs(eos=98)
        ref, out = models[name](ids, mask), tower.apply({"params": params}, ids, mask)
    else:
        x = pixels()
        ref, out = models[name](nchw(x)), tower.apply({"params": params}, x)
        mask = None
    assert max_diff(out["last_hidden_state"], ref.last_hidden_state,
                    None if mask is None else mask) <= TOL
    assert max_diff(out["pooled"], ref.pooler_output) <= TOL


@pytest.mark.parametrize("name,flax_cls", [("bert", tf.FlaxBertModel), ("vit", tf.FlaxViTModel),
                                           ("clip_text", tf.FlaxCLIPTextModel),
                                           ("clip_vision", tf.FlaxCLIPVisionModel)])
def test_save_tower_loads_in_transformers(checkpoints, tmp_path, name, flax_cls):
    root, _ = checkpoints
    tower, params = hf.load_tower(root / name)
    hf.save_tower(tower, params, tmp_path)
    reloaded = flax_cls.from_pretrained(tmp_path)
    if name in ("bert", "clip_text"):
        ids, mask = text_inputs(eos=98)
        ref, out = reloaded(ids, mask), tower.apply({"params": params}, ids, mask)
    else:
        x = pixels()
        ref, out = reloaded(nchw(x)), tower.apply({"params": params}, x)
        mask = None
    assert max_diff(out["last_hidden_state"], ref.last_hidden_state, mask) <= TOL
    # and our own loader reads the PyTorch-layout safetensors we wrote back to the same params
    (tmp_path / "flax_model.msgpack").unlink()
    _, again = hf.load_tower(tmp_path)
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                  params, again)
    assert all(jax.tree_util.tree_leaves(same))


def test_save_dual_encoder_loads_in_transformers(checkpoints, tmp_path):
    root, models = checkpoints
    model, params = hf.load_dual_encoder(root / "clip")
    hf.save_dual_encoder(model, params, tmp_path)
    reloaded = tf.FlaxCLIPModel.from_pretrained(tmp_path)
    ids, mask = text_inputs(eos=98)
    x = pixels()
    assert max_diff(reloaded.get_image_features(nchw(x)),
                    model.apply({"params": params}, x, method=model.encode_image)) <= TOL
    assert max_diff(reloaded.get_text_features(ids, mask),
                    models["clip"].get_text_features(ids, mask)) <= TOL


@pytest.mark.parametrize("fmt", ["safetensors", "msgpack"])
def test_save_dual_encoder_round_trips_every_parameter(checkpoints, tmp_path, fmt):
    """Both files read back to identical parameters, the 0-d logit_scale included."""
    root, _ = checkpoints
    model, params = hf.load_dual_encoder(root / "clip")
    hf.save_dual_encoder(model, params, tmp_path, formats=(fmt,))
    _, again = hf.load_dual_encoder(tmp_path)
    assert np.shape(again["logit_scale"]) == ()
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                  params, again)
    assert all(jax.tree_util.tree_leaves(same))


def test_saved_safetensors_load_in_pytorch(checkpoints, tmp_path):
    """Runs where torch is installed (not needed by CI): PyTorch classes read our safetensors."""
    torch = pytest.importorskip("torch")
    root, models = checkpoints
    model, params = hf.load_dual_encoder(root / "clip")
    hf.save_dual_encoder(model, params, tmp_path, formats=("safetensors",))
    pt = tf.CLIPModel.from_pretrained(tmp_path).eval()
    ids, mask = text_inputs(eos=98)
    x = pixels()
    with torch.no_grad():
        img = pt.get_image_features(torch.from_numpy(nchw(x).copy())).numpy()
        txt = pt.get_text_features(torch.from_numpy(ids).long(), torch.from_numpy(mask)).numpy()
    assert max_diff(img, model.apply({"params": params}, x, method=model.encode_image)) <= TOL
    assert max_diff(txt, model.apply({"params": params}, ids, mask, method=model.encode_text)) <= TOL
