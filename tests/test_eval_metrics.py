"""Evaluation metrics against straightforward loop references on small random features."""

import math

import numpy as np
import pytest

from valign_jax.evaluation.geometry import geometry_metrics
from valign_jax.evaluation.retrieval import retrieval_metrics
from valign_jax.evaluation.zeroshot import class_embeddings, zeroshot_metrics


def _unit(v):
    return [a / math.sqrt(sum(b * b for b in v)) for a in v]


def _dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def _ref_recall(queries, gallery, q_keys, g_keys, k):
    """Per query: sort the gallery by -cosine (ties by index), hit if any of the top k is relevant."""
    hits = 0
    for q, qk in zip(queries, q_keys):
        sims = [_dot(_unit(q), _unit(g)) for g in gallery]
        order = sorted(range(len(gallery)), key=lambda j: (-sims[j], j))
        hits += any(g_keys[j] == qk for j in order[:k])
    return hits / len(queries)


def _ref_retrieval(img, txt, img_keys, txt_keys, ks):
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = _ref_recall(img, txt, img_keys, txt_keys, k)
        out[f"t2i_r{k}"] = _ref_recall(txt, img, txt_keys, img_keys, k)
    return out


def _assert_close(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert isinstance(got[key], float), key
        assert got[key] == pytest.approx(want[key], abs=1e-10), key


@pytest.mark.parametrize("n", [7, 13])
def test_retrieval_paired_matches_reference(n):
    rng = np.random.default_rng(n)
    img, txt = rng.normal(size=(n, 5)), rng.normal(size=(n, 5))
    got = retrieval_metrics(img, txt, ks=(1, 3, 5, 10))
    _assert_close(got, _ref_retrieval(img.tolist(), txt.tolist(), list(range(n)), list(range(n)),
                                      (1, 3, 5, 10)))


def test_retrieval_multi_caption_keys():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(4, 5)), rng.normal(size=(12, 5))
    img_keys, txt_keys = [10, 11, 12, 13], [10 + j // 3 for j in range(12)]
    got = retrieval_metrics(img, txt, img_keys, txt_keys, ks=(1, 2, 5))
    _assert_close(got, _ref_retrieval(img.tolist(), txt.tolist(), img_keys, txt_keys, (1, 2, 5)))


def test_retrieval_duplicate_caption_keys_count_as_hits():
    rng = np.random.default_rng(2)
    img, txt = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
    caps = ["a dog", "a cat", "a dog", "a car", "a cat", "a tree", "a dog", "a boat", "a car"]
    got = retrieval_metrics(img, txt, caps, caps, ks=(1, 2, 5))
    _assert_close(got, _ref_retrieval(img.tolist(), txt.tolist(), caps, caps, (1, 2, 5)))
    # Image 0 retrieving text 2 (same caption) is a hit.
    img2 = txt[[2, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert retrieval_metrics(img2, txt, caps, caps, ks=(1,))["i2t_r1"] == 1.0


def test_retrieval_ties_are_broken_by_index():
    rng = np.random.default_rng(3)
    txt = rng.normal(size=(6, 5))
    txt[4] = txt[1] * 2.0  # same direction: identical cosine for every query
    img = rng.normal(size=(6, 5))
    img[1] = img[4] = txt[1]
    got = retrieval_metrics(img, txt, ks=(1, 2))
    _assert_close(got, _ref_retrieval(img.tolist(), txt.tolist(), list(range(6)), list(range(6)), (1, 2)))
    # Texts 1 and 2 are parallel, so every image ties them; text 1 (lower index) ranks first.
    # Image 0 hits, image 1 is nearest text 0, image 2 loses its tie with text 1: R@1 = 1/3.
    txt = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 2.0, 0]])
    img = np.array([[1.0, 0, 0], [1.0, 0.5, 0], [0, 1.0, 0]])
    got = retrieval_metrics(img, txt, ks=(1, 2))
    assert got["i2t_r1"] == pytest.approx(1 / 3) and got["i2t_r2"] == 1.0


def test_retrieval_perfect_and_k_clipping():
    feats = np.eye(5) + 0.01
    got = retrieval_metrics(feats, feats * 3.0, ks=(1, 5, 10, 100))
    assert all(v == 1.0 for v in got.values()) and set(got) == {
        f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10, 100)}
    rng = np.random.default_rng(4)
    img, txt = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    clipped = retrieval_metrics(img, txt, ks=(7, 50))
    assert clipped["i2t_r7"] == clipped["i2t_r50"] == clipped["t2i_r50"] == 1.0


def test_retrieval_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match=r"4 images vs 6 texts"):
        retrieval_metrics(rng.normal(size=(4, 5)), rng.normal(size=(6, 5)))
    bad = rng.normal(size=(8, 5))
    bad[[1, 6], 2] = np.nan
    bad[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"image_features: 3 of 8 rows are non-finite"):
        retrieval_metrics(bad, rng.normal(size=(8, 5)))
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(np.zeros((0, 5)), np.zeros((0, 5)))
    with pytest.raises(ValueError, match="no relevant text"):
        retrieval_metrics(rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), [0, 1, 2], [0, 1, 1])


def _ref_zeroshot(img, cls, labels, k):
    hits = 0
    for x, y in zip(img, labels):
        sims = [_dot(_unit(x), _unit(c)) for c in cls]
        order = sorted(range(len(cls)), key=lambda j: (-sims[j], j))
        hits += y in order[:k]
    return hits / len(img)


def _ref_per_class_recall(img, cls, labels):
    per_class = {}
    for x, y in zip(img, labels):
        sims = [_dot(_unit(x), _unit(c)) for c in cls]
        top = min(range(len(cls)), key=lambda j: (-sims[j], j))
        per_class.setdefault(y, []).append(top == y)
    return sum(sum(h) / len(h) for h in per_class.values()) / len(per_class)


def test_class_embeddings_matches_reference():
    rng = np.random.default_rng(6)
    n_cls, n_tpl = 4, 3
    text = rng.normal(size=(n_cls * n_tpl, 5))
    got = class_embeddings(text, n_cls, n_tpl)
    for c in range(n_cls):
        units = [_unit(text[c * n_tpl + t].tolist()) for t in range(n_tpl)]
        want = _unit([sum(u[d] for u in units) / n_tpl for d in range(5)])
        np.testing.assert_allclose(got[c], want, atol=1e-12)
    with pytest.raises(ValueError, match="4 \\* 4 = 16"):
        class_embeddings(text, 4, 4)


@pytest.mark.parametrize("n", [9, 13])
def test_zeroshot_matches_reference(n):
    rng = np.random.default_rng(n)
    img, cls = rng.normal(size=(n, 5)), rng.normal(size=(6, 5))
    labels = rng.integers(0, 6, size=n)
    got = zeroshot_metrics(img, cls, labels, ks=(1, 2, 5, 10))
    want = {f"top{k}": _ref_zeroshot(img.tolist(), cls.tolist(), labels.tolist(), k) for k in (1, 2, 5, 10)}
    want["mean_per_class_recall"] = _ref_per_class_recall(img.tolist(), cls.tolist(), labels.tolist())
    _assert_close(got, want)
    assert got["top10"] == 1.0  # k clipped to 6 classes


def test_zeroshot_perfect_and_errors():
    cls = np.eye(4, 5)
    labels = np.array([0, 1, 2, 3, 2, 1])
    assert zeroshot_metrics(cls[labels] * 2.0, cls, labels) == {
        "top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0}
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 4\)"):
        zeroshot_metrics(cls[labels], cls, np.array([0, 1, 7, 3, 2, 1]))
    with pytest.raises(ValueError, match=r"label -1"):
        zeroshot_metrics(cls[labels], cls, np.array([0, 1, 2, 3, 2, -1]))
    img = cls[labels].copy()
    img[2, 0] = np.nan
    with pytest.raises(ValueError, match="1 of 6 rows are non-finite"):
        zeroshot_metrics(img, cls, labels)


def _ref_geometry(img, txt):
    x, y = [_unit(v) for v in img], [_unit(v) for v in txt]
    n, d = len(x), len(x[0])
    diff = [sum(a[k] for a in x) / n - sum(b[k] for b in y) / n for k in range(d)]
    gap_sq = sum(v * v for v in diff)
    sq = lambda a, b: sum((p - q) ** 2 for p, q in zip(a, b))
    u = x + y
    pairs = [math.exp(-2 * sq(u[i], u[j])) for i in range(len(u)) for j in range(i + 1, len(u))]
    return {"gap": math.sqrt(gap_sq), "gap_sq_per_dim": gap_sq / d,
            "alignment": sum(sq(a, b) for a, b in zip(x, y)) / n,
            "uniformity": math.log(sum(pairs) / len(pairs))}


@pytest.mark.parametrize("n", [7, 11])
def test_geometry_matches_reference(n):
    rng = np.random.default_rng(n)
    img, txt = rng.normal(size=(n, 5)) + 1.0, rng.normal(size=(n, 5)) - 0.5
    _assert_close(geometry_metrics(img, txt), _ref_geometry(img.tolist(), txt.tolist()))


def test_geometry_identity_and_hand_computed_gap():
    rng = np.random.default_rng(8)
    feats = rng.normal(size=(10, 5))
    got = geometry_metrics(feats, feats * 4.0)
    assert got["gap"] == pytest.approx(0.0, abs=1e-12)
    assert got["alignment"] == pytest.approx(0.0, abs=1e-12)
    # One image at e1, one text at e2 (after normalising): gap = |e1 - e2| = sqrt 2, D = 3.
    got = geometry_metrics([[3.0, 0.0, 0.0]], [[0.0, 0.5, 0.0]])
    assert got["gap"] == pytest.approx(math.sqrt(2))
    assert got["gap_sq_per_dim"] == pytest.approx(2 / 3)
    assert got["alignment"] == pytest.approx(2.0)
    assert got["uniformity"] == pytest.approx(-4.0)  # log exp(-2 * 2)


def test_geometry_uniformity_subsample_is_deterministic():
    rng = np.random.default_rng(9)
    img, txt = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    a = geometry_metrics(img, txt, max_uniformity_points=30)
    b = geometry_metrics(img, txt, max_uniformity_points=30)
    full = geometry_metrics(img, txt)
    assert a == b
    assert a["uniformity"] == pytest.approx(full["uniformity"], abs=0.5)
    assert a["gap"] == full["gap"]


def test_geometry_errors():
    rng = np.random.default_rng(10)
    with pytest.raises(ValueError, match=r"\(4, 5\) vs text_features \(6, 5\)"):
        geometry_metrics(rng.normal(size=(4, 5)), rng.normal(size=(6, 5)))
    bad = rng.normal(size=(4, 5))
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="text_features: 1 of 4 rows are non-finite"):
        geometry_metrics(rng.normal(size=(4, 5)), bad)
    with pytest.raises(ValueError, match="empty"):
        geometry_metrics(np.zeros((0, 5)), np.zeros((0, 5)))
    with pytest.raises(ValueError, match="all zeros"):
        geometry_metrics(np.zeros((2, 5)), np.ones((2, 5)))


def test_mean_per_class_recall_weighs_classes_not_images():
    """Nine images of class 0, all right, and one of class 1, wrong: top-1 is 0.9 but the mean
    per-class recall is (1 + 0) / 2."""
    cls = np.eye(3, 4)
    labels = np.array([0] * 9 + [1])
    img = cls[[0] * 9 + [2]]  # the class-1 image looks like class 2 (absent from the labels)
    got = zeroshot_metrics(img, cls, labels, ks=(1,))
    assert got == {"top1": 0.9, "mean_per_class_recall": 0.5}


def test_template_sets():
    from valign_jax.data import synthetic
    from valign_jax.evaluation.templates import CLIP7, CLIP80, templates_for
    assert len(CLIP80) == len(set(CLIP80)) == 80 and set(CLIP7) <= set(CLIP80)
    assert all(t.count("{}") == 1 for t in CLIP80)
    assert templates_for("auto", "tfds:cifar100/test") == CLIP80
    assert templates_for("auto", "tfds:svhn_cropped/test") == ("a photo of the number {}",)
    assert templates_for("single", "/data/flowers") == ("a photo of {}",)
    assert templates_for("auto", "synthetic:shapes") == tuple(synthetic.ZEROSHOT_TEMPLATES)
    assert templates_for(["a {} here"], "x") == ("a {} here",)
    with pytest.raises(ValueError, match="config.eval.templates='clip81'.*clip80"):
        templates_for("clip81", "x")
    with pytest.raises(ValueError, match="exactly one"):
        templates_for(["no slot"], "x")
