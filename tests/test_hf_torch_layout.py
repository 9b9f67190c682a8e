"""Checkpoints written by transformers' PyTorch classes (model.safetensors, PyTorch layout) load
through hf.load_tower / hf.load_dual_encoder and reproduce the outputs PyTorch gave.

The fixtures and their outputs come from tests/fixtures/make_torch_fixtures.py."""

import numpy as np
import pytest

from valign_jax import hf

TOL = 1e-5


def max_diff(a, b, mask=None):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(diff[mask.astype(bool)].max() if mask is not None else diff.max())


def test_bert(torch_fixture):
    path, ref = torch_fixture("bert")
    tower, params = hf.load_tower(path, pooling="pooler")
    out = tower.apply({"params": params}, ref["input_ids"], ref["attention_mask"])
    assert max_diff(out["last_hidden_state"], ref["last_hidden_state"], ref["attention_mask"]) <= TOL
    assert max_diff(out["pooled"], ref["pooler_output"]) <= TOL


def test_vit_and_interpolated_positions(torch_fixture):
    path, ref = torch_fixture("vit")
    tower, params = hf.load_tower(path, pooling="pooler")
    out = tower.apply({"params": params}, ref["pixel_values"])
    assert max_diff(out["last_hidden_state"], ref["last_hidden_state"]) <= TOL
    assert max_diff(out["pooled"], ref["pooler_output"]) <= TOL
    # 32-px checkpoint at 48 px: HF's interpolate_pos_encoding=True is the reference.
    out48 = tower.apply({"params": params}, ref["pixel_values_48"])
    assert out48["last_hidden_state"].shape[1] == 1 + 6 * 6
    assert max_diff(out48["last_hidden_state"], ref["last_hidden_state_48"]) <= TOL


def test_position_table_resized_at_load_for_another_image_size(torch_fixture):
    """image_size=48 on a 32-px checkpoint stores the table for 48 px (as LiLT keeps DeiT's at
    256 px): the output equals HF's run-time interpolation."""
    path, ref = torch_fixture("vit")
    tower, params = hf.load_tower(path, image_size=48)
    assert params["embeddings"]["position_embeddings"].shape == (1, 1 + 6 * 6, 32)
    out = tower.apply({"params": params}, ref["pixel_values_48"])
    assert max_diff(out["last_hidden_state"], ref["last_hidden_state_48"]) <= TOL


def test_vit_classifier_checkpoint_has_prefix_and_no_pooler(torch_fixture):
    path, ref = torch_fixture("vit_classifier")
    tower, params = hf.load_tower(path)
    assert not tower.config.add_pooling_layer and "pooler" not in params
    out = tower.apply({"params": params}, ref["pixel_values"])
    assert max_diff(out["last_hidden_state"], ref["last_hidden_state"]) <= TOL
    assert max_diff(out["pooled"], ref["last_hidden_state"][:, 0]) <= TOL


@pytest.mark.parametrize("name,part", [("clip", "text"), ("clip_text", None)])
def test_clip_text(torch_fixture, name, part):
    path, ref = torch_fixture(name)
    tower, params = hf.load_tower(path, part=part)
    out = tower.apply({"params": params}, ref["input_ids"], ref["attention_mask"])
    hidden = ref.get("text_last_hidden_state", ref.get("last_hidden_state"))
    pooled = ref.get("text_pooled", ref.get("pooler_output"))
    assert max_diff(out["last_hidden_state"], hidden, ref["attention_mask"]) <= TOL
    assert max_diff(out["pooled"], pooled) <= TOL


@pytest.mark.parametrize("name,part", [("clip", "vision"), ("clip_vision", None)])
def test_clip_vision(torch_fixture, name, part):
    path, ref = torch_fixture(name)
    tower, params = hf.load_tower(path, part=part)
    out = tower.apply({"params": params}, ref["pixel_values"])
    hidden = ref.get("vision_last_hidden_state", ref.get("last_hidden_state"))
    pooled = ref.get("vision_pooled", ref.get("pooler_output"))
    assert max_diff(out["last_hidden_state"], hidden) <= TOL
    assert max_diff(out["pooled"], pooled) <= TOL


def test_clip_dual_encoder(torch_fixture):
    path, ref = torch_fixture("clip")
    model, params = hf.load_dual_encoder(path)
    variables = {"params": params}
    img = model.apply(variables, ref["pixel_values"], method=model.encode_image)
    txt = model.apply(variables, ref["input_ids"], ref["attention_mask"], method=model.encode_text)
    assert max_diff(img, ref["image_embeds"]) <= TOL
    assert max_diff(txt, ref["text_embeds"]) <= TOL
    assert abs(float(params["logit_scale"]) - float(ref["logit_scale"])) <= TOL
