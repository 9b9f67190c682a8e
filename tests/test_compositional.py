"""Compositional metrics against brute-force loops, Winoground scores on hand-made groups, the
JSONL readers (good rows, counted bad rows, refused paths) and the embedded relation sets."""

import json
import math
import os

import numpy as np
import pytest

from valign_jax.data import compositional as data
from valign_jax.data import relations
from valign_jax.evaluation import compositional as comp


def _cos(a, b):
    dot = sum(p * q for p, q in zip(a, b))
    return dot / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))


def _random_choice_task(rng, n_img=7, n_txt=15, n_items=11, dim=5):
    img, txt = rng.normal(size=(n_img, dim)), rng.normal(size=(n_txt, dim))
    image_index = rng.integers(n_img, size=n_items)
    positive = rng.integers(n_txt, size=n_items)
    negatives = [rng.choice(n_txt, size=rng.integers(1, 5), replace=False) for _ in range(n_items)]
    return img, txt, image_index, positive, negatives


def test_choice_accuracy_matches_loop():
    rng = np.random.default_rng(0)
    for trial in range(5):
        img, txt, image_index, positive, negatives = _random_choice_task(rng)
        correct = 0
        for i, p, negs in zip(image_index, positive, negatives):
            pos = _cos(img[i], txt[p])
            correct += all(pos > _cos(img[i], txt[n]) for n in negs)
        got = comp.choice_metrics(comp.cosine_score(img, txt), image_index, positive, negatives)
        assert got == {"accuracy": correct / len(image_index)}


def test_choice_accuracy_rectangular_ties_and_blocks(monkeypatch):
    pos = np.array([1.0, 0.5, 0.2, 0.7])
    neg = np.array([[0.0, 0.9], [0.5, 0.1], [0.1, 0.19], [0.8, 0.0]])
    # row 0 wins, row 1 ties (a failure), row 2 wins, row 3 loses
    assert comp.choice_accuracy(pos, neg) == 0.5
    assert comp.choice_accuracy(pos, list(neg)) == 0.5
    # a score function is called in blocks of PAIRS_PER_CALL pairs; the result does not change
    rng = np.random.default_rng(1)
    table = rng.normal(size=(6, 9))
    image_index, positive = rng.integers(6, size=20), rng.integers(9, size=20)
    negatives = rng.integers(9, size=(20, 3))
    calls = []

    def score(i, t):
        calls.append(len(i))
        return table[i, t]
    want = np.mean([table[i, p] > table[i, negs].max()
                    for i, p, negs in zip(image_index, positive, negatives)])
    assert comp.choice_metrics(score, image_index, positive, negatives)["accuracy"] == want
    monkeypatch.setattr(comp, "PAIRS_PER_CALL", 7)
    calls.clear()
    assert comp.choice_metrics(score, image_index, positive, negatives)["accuracy"] == want
    assert max(calls) == 7 and sum(calls) == 20 * 4


def test_choice_errors():
    with pytest.raises(ValueError, match="no negatives"):
        comp.choice_accuracy([1.0, 2.0], [[0.5], []])
    with pytest.raises(ValueError, match="non-finite"):
        comp.choice_accuracy([np.nan], [[0.0]])
    with pytest.raises(ValueError, match="one float per pair"):
        comp.choice_metrics(lambda i, t: np.zeros(1), [0, 1], [0, 1], [[1], [0]])
    with pytest.raises(ValueError, match="non-finite"):
        comp.choice_metrics(lambda i, t: np.full(len(i), np.inf), [0], [0], [[1]])
    with pytest.raises(ValueError, match="feature dims"):
        comp.cosine_score(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"text index out of range \[0, 2\)"):
        comp.choice_metrics(comp.cosine_score(np.eye(2), np.eye(2)), [0], [0], [[-1]])


def test_winoground_hand_made_groups():
    def group(c0i0, c0i1, c1i0, c1i1):
        return [[c0i0, c0i1], [c1i0, c1i1]]     # [caption][image]
    perfect = group(0.9, 0.1, 0.2, 0.8)
    # each image prefers its caption, but C0 prefers I1 (0.6 > 0.5): text only
    text_only = group(0.5, 0.6, 0.4, 0.9)
    # each caption prefers its image, but I0 prefers C1 (0.55 > 0.5): image only
    image_only = group(0.5, 0.4, 0.55, 0.6)
    # a bag-of-words model: both captions score the same on each image -> ties fail
    bag_of_words = group(0.7, 0.3, 0.7, 0.3)
    for g, want in ((perfect, (1, 1, 1)), (text_only, (1, 0, 0)), (image_only, (0, 1, 0)),
                    (bag_of_words, (0, 0, 0))):
        got = comp.winoground_scores([g])
        assert (got["text"], got["image"], got["group"]) == want
    both = comp.winoground_scores([perfect, text_only, image_only, bag_of_words])
    assert both == {"text": 0.5, "image": 0.5, "group": 0.25}
    with pytest.raises(ValueError, match=r"\(G, 2, 2\)"):
        comp.winoground_scores(np.zeros((3, 2)))


def test_group_metrics_match_loop():
    rng = np.random.default_rng(2)
    img, txt = rng.normal(size=(8, 4)), rng.normal(size=(9, 4))
    images = np.stack([rng.choice(8, 2, replace=False) for _ in range(30)])
    texts = np.stack([rng.choice(9, 2, replace=False) for _ in range(30)])
    text = image = group = 0
    for (i0, i1), (c0, c1) in zip(images, texts):
        s = {(c, i): _cos(txt[c], img[i]) for c in (c0, c1) for i in (i0, i1)}
        t_ok = s[c0, i0] > s[c1, i0] and s[c1, i1] > s[c0, i1]
        i_ok = s[c0, i0] > s[c0, i1] and s[c1, i1] > s[c1, i0]
        text, image, group = text + t_ok, image + i_ok, group + (t_ok and i_ok)
    got = comp.group_metrics(comp.cosine_score(img, txt), images, texts)
    assert got == {"text": text / 30, "image": image / 30, "group": group / 30}
    assert 0 < got["group"] < 1   # the random case exercises both outcomes


# ---------------------------------------------------------------------------------------------
# JSONL


def _image(path, data=b"\x89PNG fake"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_choice_jsonl(tmp_path):
    root = tmp_path / "set"
    for name in ("a.png", "b.png", "img/c.png"):
        _image(root / name)
    _image(root / "empty.png", b"")
    _image(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    rows = [
        {"image": "a.png", "caption": "a dog on a sofa", "negatives": ["a sofa on a dog"]},
        {"image": "img/c.png", "caption": "a cat", "negatives": ["a dog", "a sofa on a dog"]},
        {"image": "a.png", "caption": "a red dog", "negatives": ["a dog red"]},   # same image
        "{not json",
        ["a list"],
        {"image": "b.png", "caption": "x"},                                       # no negatives
        {"image": "b.png", "caption": "x", "negatives": []},
        {"image": "b.png", "caption": "x", "negatives": ["y", 3]},
        {"image": "b.png", "caption": "", "negatives": ["y"]},
        {"image": "b.png", "caption": "x", "negatives": ["y", "x"]},              # unwinnable
        {"image": "missing.png", "caption": "x", "negatives": ["y"]},
        {"image": "empty.png", "caption": "x", "negatives": ["y"]},
        {"image": "../outside.png", "caption": "x", "negatives": ["y"]},
        {"image": str(tmp_path / "outside.png"), "caption": "x", "negatives": ["y"]},
        {"image": "link.png", "caption": "x", "negatives": ["y"]},
        {"caption": "x", "negatives": ["y"]},
    ]
    _write_jsonl(root / "set.jsonl", rows)
    got = data.open_compositional(root / "set.jsonl")
    assert isinstance(got, data.ChoiceSet) and got.name == "set" and len(got) == 3
    assert len(got.skipped) == 13
    assert sum("outside the dataset root" in r for r in got.skipped) == 3
    for reason in ("invalid JSON", "JSON object", "negatives must be", "negatives[1]",
                   "caption must be", "could never be won", "missing or empty", "no image path"):
        assert any(reason in r for r in got.skipped), reason
    assert got.texts == ("a dog on a sofa", "a sofa on a dog", "a cat", "a dog", "a red dog",
                         "a dog red")
    assert got.image_index.tolist() == [0, 1, 0] and len(got.images) == 2
    assert got.positive.tolist() == [0, 2, 4]
    assert [n.tolist() for n in got.negatives] == [[1], [3, 1], [5]]
    assert got.images[1] == b"\x89PNG fake" and got.images.describe(1).endswith("img/c.png")

    # an image that fails to decode later drops its items, counted
    fewer = got.without_images({0: "a.png: not an image"})
    assert len(fewer) == 1 and fewer.positive.tolist() == [2]
    assert len(fewer.skipped) == 15 and fewer.skipped[-1] == "item 2: a.png: not an image"
    # metrics run on what the reader produced
    img = np.eye(2, 3)
    # items 0 and 1 are won; item 2's negative ties with its caption, a failure
    txt = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0.5, 1, 0], [1, 0, 0], [2, 0, 0]])
    score = comp.cosine_score(img, txt)
    assert comp.choice_metrics(score, got.image_index, got.positive, got.negatives) == {
        "accuracy": 2 / 3}


def test_group_jsonl(tmp_path):
    root = tmp_path / "wino"
    for name in ("0a.png", "0b.png", "1a.png", "1b.png"):
        _image(root / "images" / name)
    _image(tmp_path / "evil.png")
    rows = [
        {"images": ["images/0a.png", "images/0b.png"],
         "captions": ["a mug in some grass", "some grass in a mug"]},
        {"images": ["images/1a.png", "images/1b.png"], "captions": ["c0", "c1"]},
        {"images": ["images/1a.png"], "captions": ["c0", "c1"]},
        {"images": ["images/1a.png", "images/1b.png"], "captions": ["c0", "c0"]},
        {"images": ["images/1a.png", "images/../images/1a.png"], "captions": ["c0", "c1"]},
        {"images": ["images/1a.png", "../evil.png"], "captions": ["c0", "c1"]},
        {"images": ["images/1a.png", "images/gone.png"], "captions": ["c0", "c1"]},
        {"images": ["images/1a.png", "images/1b.png"], "captions": ["c0", None]},
        "",
        "[1, 2]",
    ]
    _write_jsonl(root / "groups.jsonl", rows)
    got = data.open_compositional(root / "groups.jsonl", name="wino")
    assert isinstance(got, data.GroupSet) and got.name == "wino" and len(got) == 2
    assert len(got.skipped) == 7
    for reason in ("two of each", "captions are the same", "same file", "outside the dataset root",
                   "missing or empty", "captions[1]", "JSON object"):
        assert any(reason in r for r in got.skipped), reason
    assert got.group_images.tolist() == [[0, 1], [2, 3]]
    assert [got.texts[c] for c in got.group_texts[0]] == ["a mug in some grass",
                                                          "some grass in a mug"]
    fewer = got.without_images({3: "1b.png: truncated"})
    assert fewer.group_images.tolist() == [[0, 1]] and fewer.skipped[-1] == \
        "group 1: 1b.png: truncated"


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, [{"image": "nope.png", "caption": "x", "negatives": ["y"]}])
    with pytest.raises(ValueError, match="bad.jsonl: no usable choice row"):
        data.open_compositional(bad)
    other = tmp_path / "other.jsonl"
    _write_jsonl(other, [{"image": "a.png", "caption": "x"}])
    with pytest.raises(ValueError, match="config.evals.x.path.*'negatives' or 'images'"):
        data.open_compositional(other, key="config.evals.x.path")
    with pytest.raises(FileNotFoundError, match="not a file"):
        data.open_compositional(tmp_path / "absent.jsonl")


# ---------------------------------------------------------------------------------------------
# The embedded relation sets


def _objects(caption):
    """'a red square left of a blue circle ...' -> [("red", "square"), ...] left to right."""
    return [tuple(part.split()[1:]) for part in caption.split(" left of ")]


def test_relation_groups_twins_differ_only_in_binding():
    groups = relations.relation_groups(12, image_size=36, seed=3)
    assert len(groups) == 12 and len(groups.images) == 24 and groups.skipped == ()
    column = 36 // 3
    for g, ((i0, i1), (c0, c1)) in enumerate(zip(groups.group_images, groups.group_texts)):
        a, b = groups.images.scene(i0), groups.images.scene(i1)
        assert relations.held_out(a) and relations.held_out(b)
        assert [s for _, s in a] == [s for _, s in b]                  # same shapes, same places
        assert sorted(c for c, _ in a) == sorted(c for c, _ in b)      # same colours
        moved = [k for k in range(3) if a[k] != b[k]]
        assert len(moved) == 2                                         # one swap of bindings
        assert _objects(groups.texts[c0]) == list(a) and _objects(groups.texts[c1]) == list(b)
        assert sorted(groups.texts[c0].split()) == sorted(groups.texts[c1].split())
        # the images are one draw: identical except inside the two swapped objects' columns
        x, y = groups.images[i0].astype(int), groups.images[i1].astype(int)
        assert x.shape == (36, 36, 3) and x.dtype == int
        differs = np.abs(x - y).sum(axis=2) > 0
        kept = ({0, 1, 2} - set(moved)).pop()
        assert differs.any() and not differs[:, kept * column:(kept + 1) * column].any()
    # deterministic, and the size is the caller's
    again = relations.relation_groups(12, image_size=36, seed=3)
    np.testing.assert_array_equal(again.images[5], groups.images[5])
    assert relations.relation_groups(2, image_size=20).images[0].shape == (20, 20, 3)
    with pytest.raises(ValueError, match="num_groups"):
        relations.relation_groups(len(relations.EVAL_SCENES) + 1)


def test_relation_choices_negatives():
    choices = relations.relation_choices(10, image_size=32, seed=1)
    groups = relations.relation_groups(10, image_size=32, seed=1)
    assert len(choices) == 20
    np.testing.assert_array_equal(choices.images[3], groups.images[3])   # the same images
    for n, (i, p, negs) in enumerate(zip(choices.image_index, choices.positive,
                                         choices.negatives)):
        scene, true = choices.images.scene(i), choices.texts[p]
        assert _objects(true) == list(scene)
        negatives = [choices.texts[t] for t in negs]
        assert len(set(negatives)) == 4 and true not in negatives
        for caption in negatives:
            assert sorted(caption.split()) == sorted(true.split())     # same words
        swaps, mirror = negatives[:3], negatives[3]
        assert _objects(mirror) == list(scene)[::-1]
        for caption in swaps:   # same shapes in the same places, two colours traded
            assert [s for _, s in _objects(caption)] == [s for _, s in scene]
            assert sum(o != t for o, t in zip(_objects(caption), scene)) == 2
        twin = choices.positive[n ^ 1]
        assert twin in negs[:3]                                        # the twin's caption
    only_mirror = relations.relation_choices(3, negatives=("mirror",))
    assert all(len(n) == 1 for n in only_mirror.negatives)
    with pytest.raises(ValueError, match="negative kinds"):
        relations.relation_choices(3, negatives=("shuffle",))


def test_relation_sets_score_binding_not_bags_of_words():
    """A feature that knows which colour sits on which shape where wins every item and group;
    a bag of words ties on every negative and so wins none (ties are failures)."""
    vocabulary = {}

    def triples(objects):
        v = np.zeros(3 * 6 * 4)
        for k, (colour, shape) in enumerate(objects):
            v[vocabulary.setdefault((k, colour, shape), len(vocabulary))] = 1.0
        return v

    def bag(objects):
        v = np.zeros(10)
        for colour, shape in objects:
            v[relations.COLOURS.index(colour)] += 1
            v[6 + relations.SHAPES.index(shape)] += 1
        return v
    choices = relations.relation_choices(16)
    groups = relations.relation_groups(16)
    for encode, want in ((triples, 1.0), (bag, 0.0)):
        img = np.stack([encode(choices.images.scene(i)) for i in range(len(choices.images))])
        txt = np.stack([encode(_objects(t)) for t in choices.texts])
        got = comp.choice_metrics(comp.cosine_score(img, txt), choices.image_index,
                                  choices.positive, choices.negatives)
        assert got == {"accuracy": want}
        txt = np.stack([encode(_objects(t)) for t in groups.texts])
        got = comp.group_metrics(comp.cosine_score(img, txt), groups.group_images,
                                 groups.group_texts)
        assert got == {"text": want, "image": want, "group": want}
