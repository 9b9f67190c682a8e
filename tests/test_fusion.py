"""The fusion re-ranker: padding never matters, hard negatives are never positives, re-ranking
agrees with brute force (and with the dual encoder at k=1), the layers work on every tower
family, and the compositional eval split holds swapped-binding twins."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valign_jax import losses
from valign_jax.data import synthetic
from valign_jax.data.relations import SyntheticRelations
from valign_jax.evaluation import retrieval
from valign_jax.evaluation.rerank import reranked_recall
from valign_jax.recipes import load_config
from valign_jax.run_setup import build_model

from conftest import REPO


def fusion_model(image_preset="clip_tiny_vision", text_preset="clip_tiny_text"):
    config = load_config(f"{REPO}/configs/fusion.py:demo")
    config.model.image.preset, config.model.text.preset = image_preset, text_preset
    return build_model(config)


@pytest.mark.parametrize("image_preset,text_preset", [
    ("clip_tiny_vision", "clip_tiny_text"), ("vit_tiny", "bert_tiny"),
    ("dinov2_tiny", "clip_tiny_text"), ("clip_tiny_vision", "bert_tiny")])
def test_padding_changes_nothing_with_every_tower_family(image_preset, text_preset):
    model = fusion_model(image_preset, text_preset)
    inputs = model.dummy_inputs(batch=3)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=inputs["pixel_values"].shape).astype(np.float32)
    ids = rng.integers(4, 60, size=(3, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 5:], mask[1, 3:] = 0, 0
    params = model.init(jax.random.PRNGKey(0), pixels, ids, mask)["params"]
    out = model.apply({"params": params}, pixels, ids, mask)
    assert out["match_logits"].shape == (3,) and np.isfinite(out["match_logits"]).all()
    assert out["image_tokens"].ndim == out["text_tokens"].ndim == 3

    # Other ids under the padding: the same match logits, through the towers and the fusion.
    other_ids = np.where(mask == 1, ids, rng.integers(4, 60, size=ids.shape)).astype(np.int32)
    again = model.apply({"params": params}, pixels, other_ids, mask)
    np.testing.assert_allclose(again["match_logits"], out["match_logits"], atol=1e-5)
    # ... and garbage in the padded token states themselves changes nothing in the head.
    noisy = np.where(mask[..., None] == 1, out["text_tokens"], 1e3)
    logits = model.apply({"params": params}, out["image_tokens"], noisy, mask,
                         method=model.match_logits)
    np.testing.assert_allclose(logits, out["match_logits"], atol=1e-5)
    # A real token does change the score (the test above could not pass vacuously).
    changed = ids.copy()
    changed[0, 1] = ids[0, 1] + 1
    moved = model.apply({"params": params}, pixels, changed, mask)["match_logits"]
    assert abs(float(moved[0] - out["match_logits"][0])) > 1e-6


def test_hard_negatives_are_never_positives_and_follow_similarity():
    rng = np.random.default_rng(1)
    batch = 6
    captions = np.array([0, 1, 1, 2, 3, 3])   # rows 1/2 and 4/5 share a caption
    positives = jnp.asarray(captions[:, None] == captions[None, :])
    similarity = jnp.asarray(rng.normal(size=(batch, batch)) * 3, jnp.float32)
    draws = jax.vmap(lambda k: losses.sample_hard_negatives(k, similarity, positives))(
        jax.random.split(jax.random.PRNGKey(0), 4000))
    index, valid = np.asarray(draws[0]), np.asarray(draws[1])
    assert valid.all()
    assert not (captions[index] == captions[None, :]).any()  # never the pair, never its twin
    # Frequencies follow softmax(similarity) over the allowed columns.
    allowed = ~np.asarray(positives)
    want = np.where(allowed, np.exp(np.asarray(similarity)), 0)
    want /= want.sum(1, keepdims=True)
    got = np.stack([np.bincount(index[:, i], minlength=batch) for i in range(batch)]) / 4000
    np.testing.assert_allclose(got, want, atol=0.03)

    # A batch of one caption has no negative: flagged, and the loss ignores it.
    same = jnp.ones((3, 3), bool)
    _, ok = losses.sample_hard_negatives(jax.random.PRNGKey(1), similarity[:3, :3], same)
    assert not np.asarray(ok).any()
    pos, neg = jnp.array([2.0, -1.0, 0.5]), jnp.array([0.3, 0.1, -2.0])
    want_loss = np.mean(np.log1p(np.exp(-np.asarray(pos))))
    assert float(losses.itm(pos, [neg], [ok])) == pytest.approx(want_loss, rel=1e-6)
    ok2 = jnp.array([True, False, True])
    both = np.concatenate([np.log1p(np.exp(-np.asarray(pos))),
                           np.log1p(np.exp(np.asarray(neg)))[[0, 2]]])
    assert float(losses.itm(pos, [neg], [ok2])) == pytest.approx(both.mean(), rel=1e-6)


def brute_force_reranked(queries, gallery, q_codes, g_codes, score, k, m):
    hits = 0
    for q in range(len(queries)):
        sims = [float(np.dot(queries[q] / np.linalg.norm(queries[q]),
                             g / np.linalg.norm(g))) for g in gallery]
        order = sorted(range(len(gallery)), key=lambda j: (-sims[j], j))
        top, rest = order[:k], order[k:]
        s = {j: score(np.array([q]), np.array([j]))[0] for j in top}
        top = sorted(top, key=lambda j: (-s[j], top.index(j)))
        hits += any(q_codes[q] == g_codes[j] for j in (top + rest)[:m])
    return hits / len(queries)


def test_reranking_matches_brute_force_and_k1_is_the_dual_ranking():
    rng = np.random.default_rng(2)
    queries, gallery = rng.normal(size=(9, 4)), rng.normal(size=(7, 4))
    q_codes, g_codes = rng.integers(0, 4, 9), np.array([0, 1, 2, 3, 0, 1, 2])
    table = rng.normal(size=(9, 7))

    def score(q, g):
        return table[q, g]
    for k in (1, 3, 7):
        got = reranked_recall(queries, gallery, q_codes, g_codes, score, k, ks=(1, 2, 5))
        for m in (1, 2, 5):
            assert got[f"r{m}"] == pytest.approx(brute_force_reranked(
                queries, gallery, q_codes, g_codes, score, k, m)), (k, m)
    dual = retrieval.retrieval_metrics(queries, gallery, q_codes, g_codes)
    k1 = reranked_recall(queries, gallery, q_codes, g_codes, score, 1)
    assert k1 == {f"r{m}": dual[f"i2t_r{m}"] for m in (1, 5, 10)}
    # An oracle second stage lifts R@1 to the dual encoder's R@k.
    oracle = reranked_recall(queries, gallery, q_codes, g_codes,
                             lambda q, g: (q_codes[q] == g_codes[g]).astype(float), 5)
    assert oracle["r1"] == dual["i2t_r5"]


def test_compositional_eval_split_pairs_swapped_bindings():
    """Eval examples 2k and 2k+1 share their bag of words but not the image; no training scene
    uses an eval scene's colours on its shape sequence (so no twin is ever trained on)."""
    data = SyntheticRelations("eval", num_examples=40, image_size=48)
    vocabulary = set(synthetic.VOCABULARY)
    for i in range(0, 40, 2):
        a, b = data[i]["caption"], data[i + 1]["caption"]
        assert a != b and sorted(a.split()) == sorted(b.split())  # same words, other binding
        assert set(synthetic.words(a)) <= vocabulary
        assert not np.array_equal(data[i]["image"], data[i + 1]["image"])

    def group(scene):
        return sorted(c for c, _ in scene), [s for _, s in scene]
    train = SyntheticRelations("train", num_examples=2000, image_size=48)
    train_groups = {str(group(train.scene(i))) for i in range(2000)}
    assert len(train_groups) > 300
    assert not train_groups & {str(group(data.scene(i))) for i in range(40)}


def test_a_fusion_run_resumes_and_evaluates_like_every_recipe(tmp_path):
    from valign_jax import evaluate, train
    from train_helpers import tiny_config
    config = tiny_config("fusion", steps=2)
    config.objective.itm_negatives = 2
    train.train_and_evaluate(config, tmp_path)
    config.total_steps = 4  # the same command with a longer schedule resumes at step 2
    final = train.train_and_evaluate(config, tmp_path)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 2, 4] and final["step"] == 4
    result = evaluate.evaluate(workdir=tmp_path, out=tmp_path / "eval.json")
    for key in ("retrieval/t2i_r1", "retrieval_reranked/t2i_r1", "retrieval_reranked/i2t_r5"):
        assert result["metrics"][key] == pytest.approx(final[key], abs=1e-6), key
    assert result["ln_shift"]["image"]["layers"] == [0, 1]
    check_rerank_scores(tmp_path)


def check_rerank_scores(workdir):
    """Both re-ranking rules against reranked_recall fed with scores computed here: the match
    head's logit alone, and plus exp(logit_scale) * cosine of the pair."""
    from valign_jax import sharding
    from valign_jax.evaluate import _from_workdir
    from valign_jax.evaluation.build import make_evaluator
    from valign_jax.run_setup import input_setup
    model, params, _, config = _from_workdir(workdir, None, None)
    mesh = sharding.make_mesh(1, 1)
    param_sh = sharding.tree_shardings(params, mesh, config.mesh.min_fsdp_size)
    image_size, collate = input_setup(config, model)
    placed = sharding.put(params, param_sh)
    scale = float(np.exp(params["logit_scale"]))
    for rule, weight in (("itm", 0.0), ("itm+contrastive", scale)):
        config.eval.rerank_score = rule
        evaluator = next(e for e in make_evaluator(config, model, mesh, param_sh, collate,
                                                   image_size).evaluators
                         if e.entry_name == "retrieval")
        got, img, txt = evaluator.run(placed)
        _, itok = evaluator.encoder.image_tokens(placed, evaluator.data.images,
                                                 evaluator.data.prepare)
        _, ttok = evaluator.encoder.text_tokens(placed, evaluator.tokens)
        mask = evaluator.tokens["attention_mask"]
        unit_i = img / np.linalg.norm(img, axis=1, keepdims=True)
        unit_t = txt / np.linalg.norm(txt, axis=1, keepdims=True)

        def t2i(q, g, weight=weight):
            return (np.asarray(evaluator.encoder.match(placed, itok[g], ttok[q], mask[q]))
                    + weight * np.einsum("pd,pd->p", unit_t[q], unit_i[g]))
        want = reranked_recall(txt, img, evaluator.text_keys, evaluator.image_keys, t2i,
                               config.eval.rerank_k)
        for m in (1, 5):
            assert got[f"retrieval_reranked/t2i_r{m}"] == pytest.approx(want[f"r{m}"]), rule


def test_a_matching_loss_without_fusion_layers_is_named(tmp_path):
    from valign_jax import train
    from train_helpers import tiny_config
    config = tiny_config("clip")
    config.objective.itm_weight = 1.0
    with pytest.raises(ValueError, match="itm_weight > 0 needs .*model.fusion_layers"):
        train.train_and_evaluate(config, tmp_path)


def test_the_run_summary_shows_the_reranked_recall():
    """The last lines a fusion run prints hold retrieval_reranked/* beside retrieval/*."""
    from valign_jax.main import summary
    text = summary("/tmp/run", {"step": 7, "retrieval/t2i_r1": 0.5,
                                "retrieval_reranked/t2i_r1": 0.625,
                                "retrieval_reranked/t2i_r5": 1.0})
    assert "'retrieval_reranked/t2i_r1': 0.625" in text and "t2i_r5" not in text
