"""The embedded synthetic dataset is deterministic and held out per split, its captions name what
the image shows, its vocabulary is closed, and the word tokenizer pads, truncates and
round-trips."""

import numpy as np
import pytest

from valign_jax.data import synthetic as syn
from valign_jax.data.synthetic import (BOS_ID, CLASS_NAMES, EOS_ID, PAD_ID, UNK_ID, VOCABULARY,
                                       ZEROSHOT_TEMPLATES, SyntheticImageText, WordTokenizer, words)

N = 2000


@pytest.fixture(scope="module")
def train():
    source = SyntheticImageText("train", num_examples=N, image_size=32, seed=0)
    return [source[i] for i in range(N)]


def _coloured(image):
    """Pixels of the shapes: the background stays far below 110 in every channel."""
    return image.max(axis=-1) > 110


def test_example_format(train):
    ex = train[0]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
    assert isinstance(ex["caption"], str) and isinstance(ex["long_caption"], str)
    assert isinstance(ex["captions"], tuple) and len(ex["captions"]) >= 3
    assert ex["captions"][0] == ex["caption"] and len(set(ex["captions"])) == len(ex["captions"])
    assert isinstance(ex["label"], int) and 0 <= ex["label"] < len(CLASS_NAMES)
    assert set(ex["attributes"]) == set(syn.ATTRIBUTES)
    for size in (64, 224):
        assert SyntheticImageText("eval", 3, image_size=size)[2]["image"].shape == (size, size, 3)


def test_deterministic_and_held_out():
    a, b = SyntheticImageText("train", 50, seed=0), SyntheticImageText("train", 50, seed=0)
    ev, other = SyntheticImageText("eval", 50, seed=0), SyntheticImageText("train", 50, seed=1)
    for i in (0, 7, 49):
        assert np.array_equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
        assert a[i]["captions"] == b[i]["captions"] and a[i]["long_caption"] == b[i]["long_caption"]
    assert np.array_equal(a[np.int64(3)]["image"], a[3]["image"])  # numpy indices work too
    for stream in (ev, other):
        assert not any(np.array_equal(a[i]["image"], stream[i]["image"]) for i in range(50))
        assert [a[i]["caption"] for i in range(50)] != [stream[i]["caption"] for i in range(50)]


def test_errors():
    source = SyntheticImageText("eval", 5)
    assert len(source) == 5
    for bad in (5, -1, 100):
        with pytest.raises(IndexError):
            source[bad]
    with pytest.raises(ValueError, match="train.*eval|eval.*train"):
        SyntheticImageText("test", 5)


def test_captions_name_the_attributes(train):
    for ex in train[:300]:
        a = ex["attributes"]
        shape = a["shape"] if a["count"] == "one" else syn.PLURALS[a["shape"]]
        expected_words = {a["size"], a["colour"], shape, a["position"]}
        for text in ex["captions"] + (ex["long_caption"],):
            assert expected_words <= set(words(text)), text
            others = {w for name, values in syn.ATTRIBUTES.items() if name != "count"
                      for w in values if w != a[name]}
            assert not others & set(words(text)), text  # no other attribute value is named
        assert CLASS_NAMES[ex["label"]] == f"{a['colour']} {a['shape']}"
        if a["count"] == "two":
            assert ex["caption"].startswith("two ") and " are " in ex["captions"][2]
        else:
            assert ex["caption"].startswith("a ") and " is " in ex["captions"][2]
        assert ex["caption"] == syn.canonical_caption(a)
    same = {}
    for ex in train:  # equal attributes <=> equal canonical caption
        same.setdefault(ex["caption"], set()).add(tuple(sorted(ex["attributes"].items())))
    assert all(len(v) == 1 for v in same.values())


def test_grammar_examples():
    one = dict(count="one", size="small", colour="red", shape="circle", position="left")
    two = dict(count="two", size="large", colour="blue", shape="cross", position="top")
    assert syn.canonical_caption(one) == "a small red circle on the left"
    assert syn.canonical_caption(two) == "two large blue crosses at the top"


def test_distinct_captions_and_class_coverage(train):
    n_tuples = np.prod([len(v) for v in syn.ATTRIBUTES.values()])
    assert 100 <= n_tuples <= 500
    distinct = {ex["caption"] for ex in train}
    assert 0.9 * n_tuples <= len(distinct) <= n_tuples
    assert {ex["label"] for ex in train} == set(range(len(CLASS_NAMES)))
    assert len(CLASS_NAMES) == len(syn.COLOURS) * len(syn.SHAPES) == len(set(CLASS_NAMES))


def test_vocabulary_is_complete(train):
    vocab = set(VOCABULARY)
    assert len(vocab) == len(VOCABULARY) and all(w == w.lower() for w in VOCABULARY)
    texts = [t for ex in train for t in ex["captions"] + (ex["long_caption"],)]
    texts += list(CLASS_NAMES) + [t.format(c) for t in ZEROSHOT_TEMPLATES for c in CLASS_NAMES]
    for text in texts:
        assert set(words(text)) <= vocab, text
    assert words("A photo, of a Cat.") == ["a", "photo", ",", "of", "a", "cat", "."]
    assert WordTokenizer(8).vocab_size == 4 + len(VOCABULARY) <= 512


def test_tokenizer_round_trip(train):
    tok = WordTokenizer(max_length=64)
    texts = [ex["long_caption"] for ex in train[:20]] + [ex["captions"][3] for ex in train[:20]]
    batch = tok(texts)
    assert batch["input_ids"].shape == (40, 64) and batch["input_ids"].dtype == np.int32
    assert batch["attention_mask"].dtype == np.int32
    for ids, mask, text in zip(batch["input_ids"], batch["attention_mask"], texts):
        n = len(words(text)) + 2
        assert ids[0] == BOS_ID and ids[n - 1] == EOS_ID and (ids[n:] == PAD_ID).all()
        assert mask.tolist() == [1] * n + [0] * (64 - n)
        assert [VOCABULARY[i - 4] for i in ids[1:n - 1]] == words(text)
        assert tok.decode(ids) == words(text)
        assert UNK_ID not in ids


def test_tokenizer_padding_truncation_unknown():
    tok = WordTokenizer(max_length=6)
    batch = tok(["a red circle", "two large blue squares at the top", "a zebra", ""])
    ids, mask = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    v = {w: i + 4 for i, w in enumerate(VOCABULARY)}
    assert ids[0] == [BOS_ID, v["a"], v["red"], v["circle"], EOS_ID, PAD_ID]
    assert ids[1] == [BOS_ID, v["two"], v["large"], v["blue"], v["squares"], EOS_ID]  # cut; eos
    assert ids[2] == [BOS_ID, v["a"], UNK_ID, EOS_ID, PAD_ID, PAD_ID]
    assert ids[3] == [BOS_ID, EOS_ID, 0, 0, 0, 0]
    assert mask == [[1] * 5 + [0], [1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]
    assert WordTokenizer(2)(["a red circle"])["input_ids"].tolist() == [[BOS_ID, EOS_ID]]
    assert UNK_ID in WordTokenizer(6, lower_case=False)(["A red circle"])["input_ids"][0]
    assert UNK_ID not in WordTokenizer(6)(["A Red circle"])["input_ids"][0]
    with pytest.raises(TypeError, match="list of strings"):
        tok("a red circle")
    with pytest.raises(ValueError):
        WordTokenizer(1)


def test_images_show_the_attributes(train):
    half = 16
    area = {"small": [], "large": []}
    rgb = np.array([syn.COLOUR_RGB[c] for c in syn.COLOURS], np.float32)
    for ex in train[:500]:
        a, image = ex["attributes"], ex["image"]
        mask = _coloured(image)
        assert mask.any()
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
        assert {"left": cx < half, "right": cx > half, "top": cy < half,
                "bottom": cy > half}[a["position"]], (a, cy, cx)
        area[a["size"]].append(mask.sum() / (2 if a["count"] == "two" else 1))
        mean = image[mask].astype(np.float32).mean(axis=0)
        nearest = syn.COLOURS[int(np.argmin(((rgb - mean) ** 2).sum(axis=1)))]
        assert nearest == a["colour"], (a, mean)
        if a["count"] == "two":  # two separate blobs along the half's long axis
            along = ys if a["position"] in ("left", "right") else xs
            gaps = np.diff(np.unique(along))
            assert gaps.max() > 1, a
    assert np.mean(area["large"]) > 2 * np.mean(area["small"])
    assert max(area["small"]) < min(area["large"])
    background = ~_coloured(train[0]["image"])
    assert train[0]["image"][background].std() > 1  # noisy, not flat
