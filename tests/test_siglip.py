"""SigLIP and SigLIP 2 (NaFlex) checkpoints written by transformers' PyTorch classes load through
hf.load_dual_encoder / hf.load_tower and reproduce what PyTorch computed: tower states, pooled
outputs, embeddings and the logits with their bias; our NaFlex preprocessing reproduces
Siglip2ImageProcessor's; saving gives the tensors (names, shapes) transformers wrote itself.

Fixtures: tests/fixtures/make_torch_fixtures.py, group "siglip" (odd sizes, padded captions,
four aspect ratios at two patch budgets)."""

import re

import numpy as np
import pytest
from flax import traverse_util

from valign_jax import hf
from valign_jax.data.naflex import naflex_batch, naflex_size
from valign_jax.hf_files import safetensors_header
from valign_jax.models.siglip2 import antialiased_bilinear_weights

TOL = 1e-5
BUDGETS = (10, 24)
NAFLEX = ("pixel_values", "spatial_shapes", "pixel_attention_mask")


def max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def apply(model, params, fn, *args):
    return model.apply({"params": params}, *args, method=fn)


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def sigmoid_logits(model, params, pixels, ids, mask=None):
    """logits_per_image as SiglipModel computes them: exp(t)·cos + b."""
    img = apply(model, params, model.encode_image, pixels)
    txt = apply(model, params, model.encode_text, ids, mask)
    return (np.exp(float(params["logit_scale"])) * unit(img) @ unit(txt).T
            + float(params["logit_bias"])), img, txt


def check_text(path, model, params, ref):
    """The text tower attends to the padding, as SigLIP was trained (a mask given changes
    nothing), and with mask_padding=True masks it as HF does when given a mask."""
    for mask in (None, ref["attention_mask"]):
        out = apply(model, params, lambda m, i, a: m.text_model(i, a), ref["input_ids"], mask)
        assert max_diff(out["last_hidden_state"], ref["text_last_hidden_state"]) <= TOL
        assert max_diff(out["pooled"], ref["text_pooled"]) <= TOL
    tower, text_params = hf.load_tower(path, part="text", mask_padding=True)
    masked = tower.apply({"params": text_params}, ref["input_ids"], ref["attention_mask"])
    assert max_diff(masked["pooled"], ref["text_pooled_masked"]) <= TOL
    assert max_diff(masked["pooled"], out["pooled"]) > 1e-3  # the mask matters


def test_siglip_matches_transformers(torch_fixture):
    path, ref = torch_fixture("siglip")
    model, params = hf.load_dual_encoder(path)
    assert (model.image_head, model.text_head) == ("identity", "identity")
    assert float(params["logit_scale"]) == pytest.approx(float(ref["logit_scale"][0]), abs=1e-7)
    assert float(params["logit_bias"]) == pytest.approx(float(ref["logit_bias"][0]), abs=1e-7)
    check_text(path, model, params, ref)
    vision = apply(model, params, lambda m, x: m.vision_model(x), ref["pixel_values"])
    assert max_diff(vision["last_hidden_state"], ref["vision_last_hidden_state"]) <= TOL
    assert max_diff(vision["pooled"], ref["vision_pooled"]) <= TOL
    logits, img, txt = sigmoid_logits(model, params, ref["pixel_values"], ref["input_ids"],
                                      ref["attention_mask"])
    assert max_diff(unit(img), ref["image_embeds"]) <= TOL
    assert max_diff(unit(txt), ref["text_embeds"]) <= TOL
    assert max_diff(logits, ref["logits_per_image"]) <= TOL
    # the full forward gives the same embeddings, with the scale and the bias
    out = apply(model, params, None, ref["pixel_values"], ref["input_ids"])
    assert max_diff(out["image"], img) == 0 and "logit_bias" in out


def test_siglip_at_another_image_size_interpolates_positions(torch_fixture):
    """30-px checkpoint at 42 px: HF's interpolate_pos_encoding=True (bicubic) is the reference,
    run-time or with the table resized at load."""
    path, ref = torch_fixture("siglip")
    for options in ({}, {"image_size": 42}):
        tower, params = hf.load_tower(path, part="vision", **options)
        out = tower.apply({"params": params}, ref["pixel_values_42"])
        assert max_diff(out["last_hidden_state"], ref["vision_last_hidden_state_42"]) <= TOL
        assert max_diff(out["pooled"], ref["vision_pooled_42"]) <= TOL


@pytest.mark.parametrize("budget", BUDGETS)
def test_siglip2_naflex_matches_transformers(torch_fixture, budget):
    """Four aspect ratios in one padded batch, at a budget below the 4x4 position grid (the
    positions shrink, antialiased) and above it (they grow)."""
    path, ref = torch_fixture("siglip2_naflex")
    model, params = hf.load_dual_encoder(path)
    inputs = {k: ref[f"{k}_{budget}"] for k in NAFLEX}
    assert len({tuple(s) for s in inputs["spatial_shapes"]}) == 4
    vision = apply(model, params, lambda m, x: m.vision_model(x), inputs)
    assert max_diff(vision["last_hidden_state"], ref[f"vision_last_hidden_state_{budget}"]) <= TOL
    assert max_diff(vision["pooled"], ref[f"vision_pooled_{budget}"]) <= TOL
    logits, img, txt = sigmoid_logits(model, params, inputs, ref["input_ids"])
    assert max_diff(unit(img), ref[f"image_embeds_{budget}"]) <= TOL
    assert max_diff(logits, ref[f"logits_per_image_{budget}"]) <= TOL
    if budget == BUDGETS[0]:
        check_text(path, model, params, ref)


@pytest.mark.parametrize("budget", BUDGETS)
def test_naflex_preprocessing_matches_the_processor(torch_fixture, budget):
    _, ref = torch_fixture("siglip2_naflex")
    images = [ref[k] for k in ref if re.fullmatch(r"image_\d+x\d+", k)]  # in saved order
    assert len(images) == 4
    made = naflex_batch(images, patch_size=4, max_patches=budget)
    for key in NAFLEX:
        assert made[key].shape == ref[f"{key}_{budget}"].shape, key
        assert max_diff(made[key], ref[f"{key}_{budget}"]) <= 1e-6, key


@pytest.mark.parametrize("height,width,patch,budget", [
    (480, 640, 16, 256), (1, 1000, 16, 256), (1000, 7, 14, 196), (33, 33, 16, 1024),
    (2, 3, 16, 256), (224, 224, 16, 256), (50, 300, 8, 7)])
def test_naflex_size_is_the_processors_search(height, width, patch, budget):
    from transformers.models.siglip2.image_processing_siglip2 import \
        get_image_size_for_max_num_patches
    assert naflex_size(height, width, patch, budget) == get_image_size_for_max_num_patches(
        height, width, patch, budget)


def test_antialiased_weights_are_the_identity_at_the_same_size():
    weights = np.asarray(antialiased_bilinear_weights(5, 5, 5))
    assert np.allclose(weights, np.eye(5))
    shrink = np.asarray(antialiased_bilinear_weights(8, 3, 3))
    assert np.allclose(shrink.sum(1), 1) and (shrink > 0).sum() > 3 * 2  # wider than 2 taps


@pytest.mark.parametrize("name", ["siglip", "siglip2_naflex"])
def test_save_writes_the_tensors_transformers_wrote(torch_fixture, tmp_path, name):
    """The saved model.safetensors holds exactly the keys and shapes SiglipModel /
    Siglip2Model saved (so transformers loads it with no missing or unexpected keys), and loads
    back to the same parameters."""
    path, _ = torch_fixture(name)
    model, params = hf.load_dual_encoder(path)
    hf.save_dual_encoder(model, params, tmp_path)
    theirs = safetensors_header(path, path / "model.safetensors")
    ours = safetensors_header(tmp_path, tmp_path / "model.safetensors")
    assert set(ours) == set(theirs)
    assert {k: ours[k]["shape"] for k in ours} == {k: theirs[k]["shape"] for k in theirs}
    again, loaded = hf.load_dual_encoder(tmp_path)
    assert again == model
    for a, b in zip(*(sorted(traverse_util.flatten_dict(t).items()) for t in (params, loaded))):
        assert a[0] == b[0] and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("name", ["siglip", "siglip2_naflex"])
def test_saved_checkpoint_loads_in_transformers(torch_fixture, tmp_path, name):
    """With torch installed: SiglipModel / Siglip2Model.from_pretrained reports no missing or
    unexpected keys and computes the logits we compute."""
    torch = pytest.importorskip("torch")
    import transformers
    path, ref = torch_fixture(name)
    model, params = hf.load_dual_encoder(path)
    hf.save_dual_encoder(model, params, tmp_path)
    cls = transformers.SiglipModel if name == "siglip" else transformers.Siglip2Model
    loaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if name == "siglip":
        ours = ref["pixel_values"]
        theirs = {"pixel_values": torch.from_numpy(ours.transpose(0, 3, 1, 2).copy())}
    else:
        ours = {k: ref[f"{k}_{BUDGETS[0]}"] for k in NAFLEX}
        theirs = {k: torch.from_numpy(v) for k, v in ours.items()}
    with torch.no_grad():
        out = loaded.eval()(input_ids=torch.from_numpy(ref["input_ids"]), **theirs)
    logits, _, _ = sigmoid_logits(model, params, ours, ref["input_ids"])
    assert max_diff(out.logits_per_image.numpy(), logits) <= TOL


def test_scanned_and_rematerialised_towers_load_to_the_same_logits(torch_fixture):
    path, ref = torch_fixture("siglip")
    model, params = hf.load_dual_encoder(path, scan_layers=True, remat="full")
    stacked = params["vision_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
    assert stacked.shape[0] == 2  # the two layers, stacked for nn.scan
    logits, _, _ = sigmoid_logits(model, params, ref["pixel_values"], ref["input_ids"])
    assert max_diff(logits, ref["logits_per_image"]) <= TOL


@pytest.mark.parametrize("part", ["vision", "text"])
def test_one_tower_saves_as_its_own_model_and_loads_back(torch_fixture, tmp_path, part):
    path, ref = torch_fixture("siglip")
    tower, params = hf.load_tower(path, part=part)
    hf.save_tower(tower, params, tmp_path, formats=("safetensors",))
    again, loaded = hf.load_tower(tmp_path)
    assert again.config == tower.config
    inputs = (ref["pixel_values"],) if part == "vision" else (ref["input_ids"],)
    assert max_diff(again.apply({"params": loaded}, *inputs)["pooled"],
                    ref[f"{part}_pooled"]) <= TOL


def test_zero_shot_by_cosine_ranks_as_sigmoid_probabilities(torch_fixture):
    """The evaluators rank by cosine; SigLIP's probabilities σ(exp(t)·cos + b) rank the same
    (exp(t) > 0), here with the checkpoint's own scale and bias, in float64."""
    from valign_jax.evaluation.zeroshot import zeroshot_metrics
    _, ref = torch_fixture("siglip")
    rng = np.random.default_rng(0)
    images, classes = unit(rng.normal(size=(200, 36))), unit(rng.normal(size=(12, 36)))
    labels = rng.integers(0, 12, size=200)
    probs = 1 / (1 + np.exp(-(np.exp(ref["logit_scale"][0]) * images @ classes.T
                              + ref["logit_bias"][0])))
    order = np.argsort(-probs, axis=1, kind="stable")
    metrics = zeroshot_metrics(images, classes, labels, ks=(1, 5))
    assert metrics["top1"] == pytest.approx(np.mean(order[:, 0] == labels))
    assert metrics["top5"] == pytest.approx(np.mean((order[:, :5] == labels[:, None]).any(1)))


def test_inconsistent_naflex_inputs_are_named(torch_fixture):
    path, ref = torch_fixture("siglip2_naflex")
    tower, params = hf.load_tower(path, part="vision")
    inputs = {k: ref[f"{k}_{BUDGETS[0]}"] for k in NAFLEX}
    too_big = {**inputs, "spatial_shapes": inputs["spatial_shapes"] * 2}
    with pytest.raises(ValueError, match=r"h·w <= 10"):
        tower.apply({"params": params}, too_big)
    short_mask = {**inputs, "pixel_attention_mask": np.ones_like(inputs["pixel_attention_mask"])}
    with pytest.raises(ValueError, match="pixel_attention_mask marks"):
        tower.apply({"params": params}, short_mask)
    with pytest.raises(ValueError, match="missing.*spatial_shapes"):
        tower.apply({"params": params}, {"pixel_values": inputs["pixel_values"]})
