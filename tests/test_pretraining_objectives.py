"""The unimodal pretraining objectives (issue 26) against NumPy references: the classifier's
cross-entropy and accuracy, BERT's masking and the tied-decoder masked-LM loss; the batch's
labels; tower checkpoints loaded under LiLT adapters; the recipes' checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valign_jax import build, hf, objectives, recipes
from valign_jax.config_checks import find_problems
from valign_jax.data import pipeline, synthetic
from valign_jax.models import registry
from valign_jax.models.dual_encoder import DualEncoder
from valign_jax.models.layout import overlay
from valign_jax.objectives import masked_lm
from valign_jax.train_step import model_outputs

from conftest import REPO


def numpy_cross_entropy(logits, labels):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


def test_classification_is_cross_entropy_on_the_image_head():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, 16).astype(np.int32)
    labels[:3] = [7, -1, 5]  # no logit for these: counted, adding nothing
    objective = objectives.classification_objective()
    assert objective.needs == {"labels"}
    value, metrics = objective({"image": jnp.asarray(logits)}, {"labels": labels}, None)
    ok = (labels >= 0) & (labels < 5)
    expected = numpy_cross_entropy(logits[ok], labels[ok]).sum() / len(labels)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(
        np.mean((logits.argmax(-1) == labels) & ok))
    assert float(metrics["labels_beyond_head"]) == 3


def test_corruption_chooses_words_only_in_bert_proportions():
    """Never BOS, EOS or padding; about mlm_rate of the words; of those about 80% become the
    mask token, 10% stay and 10% another word of the batch."""
    tok = synthetic.WordTokenizer(16)
    source = synthetic.SyntheticImageText("train", 2048, 32)
    batch = tok([source[i]["caption"] for i in range(2048)])
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    corrupted, chosen = masked_lm.corrupt(jax.random.PRNGKey(3), ids, mask, 0.15,
                                          synthetic.UNK_ID)
    ids, corrupted, chosen = map(np.asarray, (ids, corrupted, chosen))
    words = ids >= 4  # the synthetic vocabulary's first word id
    assert not chosen[~words].any() and (corrupted[~chosen] == ids[~chosen]).all()
    assert chosen.sum() / words.sum() == pytest.approx(0.15, abs=0.01)
    masked = (corrupted[chosen] == synthetic.UNK_ID).mean()
    assert masked == pytest.approx(0.8, abs=0.03)
    # the other 20%: words (the word itself or a donor from the batch, never a special token);
    # a donor equals the word as often as that word's share of the batch's words
    assert (corrupted[chosen] >= 4).mean() == pytest.approx(1 - masked)
    share = np.bincount(ids[words], minlength=ids.max() + 1) / words.sum()
    kept = (corrupted[chosen] == ids[chosen]).mean()
    assert kept == pytest.approx(0.1 + 0.1 * (share[ids[chosen]]).mean(), abs=0.03)


def test_masked_lm_is_the_tied_decoder_cross_entropy_over_the_chosen_tokens():
    """The loss through the train step's "model" need equals NumPy's cross-entropy of
    hidden · Eᵀ, with the hidden states of the text tower run alone on the corrupted ids."""
    image, text = registry.preset("vit_tiny"), registry.preset("bert_tiny_l4")
    model = DualEncoder(image, text, projection_dim=8)
    params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs())["params"]
    tok = synthetic.WordTokenizer(16)
    source = synthetic.SyntheticImageText("eval", 32, 32)
    batch = {**tok([source[i]["caption"] for i in range(32)]),
             "pixel_values": np.zeros((32, 32, 32, 3), np.float32)}
    cfg = recipes.base_config().objective
    cfg.kind = "masked_lm"
    objective = objectives.build(cfg)
    assert objective.needs == {"model"}
    rng = jax.random.PRNGKey(7)
    value, metrics = objective(model_outputs(model, params, batch, objective), batch, rng)

    corrupted, chosen = masked_lm.corrupt(rng, jnp.asarray(batch["input_ids"]),
                                          jnp.asarray(batch["attention_mask"]), 0.15,
                                          synthetic.UNK_ID)
    tower = registry.tower_for(text)
    hidden = tower.apply({"params": params["text_model"]}, corrupted,
                         batch["attention_mask"])["last_hidden_state"]
    table = params["text_model"]["embeddings"]["word_embeddings"]["embedding"]
    logits = np.asarray(hidden, np.float64) @ np.asarray(table, np.float64).T
    chosen = np.asarray(chosen)
    ids = batch["input_ids"]
    expected = numpy_cross_entropy(logits[chosen], ids[chosen]).mean()
    np.testing.assert_allclose(float(value), expected, rtol=1e-4)
    assert float(metrics["mlm_accuracy"]) == pytest.approx(
        np.mean(logits[chosen].argmax(-1) == ids[chosen]))
    assert float(metrics["masked_tokens"]) == chosen.sum() > 0


def test_the_decoder_table_is_the_word_embeddings_even_beside_a_same_shaped_table():
    text = registry.preset("bert_tiny", vocab_size=64, max_position_embeddings=64)
    params = registry.tower_for(text).init(jax.random.PRNGKey(0),
                                           **registry.dummy_inputs(text))["params"]
    table = masked_lm.word_embeddings(params, 64)
    assert table is params["embeddings"]["word_embeddings"]["embedding"]
    with pytest.raises(ValueError, match=r"found 0 \(63, width\) embedding tables"):
        masked_lm.word_embeddings(params, 63)


def test_labels_join_the_batch_and_a_record_without_one_is_named():
    collate = pipeline.Collate(synthetic.WordTokenizer(8), (0.5,) * 3, (0.5,) * 3, labels=True)
    source = synthetic.SyntheticImageText("eval", 4, 32)
    records = [source[i] for i in range(4)]
    np.testing.assert_array_equal(collate(records)["labels"], [r["label"] for r in records])
    assert "labels" not in pipeline.Collate(synthetic.WordTokenizer(8), (0.5,) * 3,
                                            (0.5,) * 3)(records)
    records[2] = {k: v for k, v in records[2].items() if k != "label"}
    with pytest.raises(ValueError, match=rf"caption {records[2]['caption']!r}\) has label None"):
        collate(records)


def test_a_tower_checkpoint_loads_under_fresh_lilt_adapters(tmp_path):
    """A saved tower (no adapters) is the pretrained part of a model with adapters and a deep
    layer: its weights are laid over the fresh ones, which the adapters keep."""
    tower_cfg = registry.preset("bert_tiny_l4")
    tower = registry.tower_for(tower_cfg)
    saved = tower.init(jax.random.PRNGKey(1), **registry.dummy_inputs(tower_cfg))["params"]
    hf.save_tower(tower, saved, tmp_path / "text", formats=("safetensors",))
    c = recipes.load_config(f"{REPO}/configs/lilt.py:lilt_lwa,demo")
    c.model.text.checkpoint = str(tmp_path / "text")
    c.model.text.deep_layers = 1
    model = build.build_dual_encoder(c.model)
    assert model.text_config.num_hidden_layers == 4  # from the checkpoint's config.json
    loaded = build.pretrained_towers(c.model)["text_model"]
    assert not any("adapter" in k for k in _flat(loaded))
    fresh = model.init(jax.random.PRNGKey(2), **model.dummy_inputs())["params"]
    merged = overlay(jax.device_get(fresh), {"text_model": loaded})
    for path, value in _flat(merged["text_model"]).items():
        source = _flat(saved).get(path)
        expected = source if source is not None else _flat(fresh["text_model"])[path]
        np.testing.assert_array_equal(value, expected, err_msg=path)
    assert any("adapter" in p for p in _flat(merged["text_model"]))


def _flat(tree):
    from flax import traverse_util
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_the_pretraining_recipes_pass_the_checks_and_pretrained_is_explained(tmp_path,
                                                                             monkeypatch):
    for variant in ("image", "text"):
        assert find_problems(recipes.load_config(f"{REPO}/configs/pretrain.py:{variant}")) == []
    monkeypatch.setenv(recipes.PRETRAINED_TOWERS_ENV, str(tmp_path / "none"))
    for recipe in ("lilt.py:lilt_ln", "sail.py:dinov2_l_gte_l"):
        with pytest.raises(FileNotFoundError, match="python -m papers.run pretrain"):
            recipes.load_config(f"{REPO}/configs/{recipe},demo,pretrained")
        with pytest.raises(ValueError, match="use it with `demo`"):
            recipes.load_config(f"{REPO}/configs/{recipe},pretrained")


def test_a_mask_token_beyond_the_vocabulary_is_named():
    """The embedding lookup would clamp it silently: the step refuses it when traced."""
    model = DualEncoder(registry.preset("vit_tiny"), registry.preset("bert_tiny"),
                        projection_dim=8)
    params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs())["params"]
    batch = {**synthetic.WordTokenizer(16)(["a red circle", "two blue squares"]),
             "pixel_values": np.zeros((2, 32, 32, 3), np.float32)}
    objective = masked_lm.masked_lm_objective(mask_token_id=10_000)
    with pytest.raises(ValueError, match=r"mask_token_id=10000 .*\(size 512\)"):
        objective(model_outputs(model, params, batch, objective), batch, jax.random.PRNGKey(0))


def test_the_objective_evaluator_is_refused_on_a_run_from_cached_features():
    c = recipes.load_config(f"{REPO}/configs/sail.py:demo")
    assert c.data.feature_cache
    c.evals.heldout = recipes.eval_entry("objective")
    problems = find_problems(c)
    assert any("config.evals.heldout" in p and "feature_cache" in p for p in problems), problems
