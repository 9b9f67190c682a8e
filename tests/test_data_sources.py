"""Data sources by config string: tfds (mock data), pairs.jsonl / pairs.csv, class folders and
tar shards, every kind of broken row skipped and counted exactly, images of every PNG mode
converted to RGB correctly, and the errors: unknown forms, sources without a usable row."""

import io
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from valign_jax.data import pipeline, sources, synthetic, transforms
from valign_jax.data.transforms import BrokenRecord

DATA_CFG = SimpleNamespace(image_mean=(0.5,) * 3, image_std=(0.5,) * 3, num_train=8, num_eval=8,
                           seed=0, get=lambda key, default=None: default)


def encode(array, fmt="PNG", mode=None, **save):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=fmt, **save) if mode else \
        Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def image(seed, size=(20, 28)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def jpeg(seed):
    return encode(image(seed), "JPEG")


# ---------------------------------------------------------------------------------------------
# Decoding


def test_every_png_mode_becomes_rgb_with_the_right_pixels():
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128]]], np.uint8)
    # composited on white: opaque red stays red, transparent -> white, half-black -> grey
    np.testing.assert_array_equal(transforms.decode(encode(rgba)),
                                  [[[255, 0, 0], [255, 255, 255], [127, 127, 127]]])
    gray = np.array([[0, 100, 255]], np.uint8)
    np.testing.assert_array_equal(transforms.decode(encode(gray)),
                                  np.repeat(gray[..., None], 3, -1))
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([0, 1, 2])
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=2)   # palette entry 2 (blue) transparent
    np.testing.assert_array_equal(transforms.decode(buffer.getvalue()),
                                  [[[255, 0, 0], [0, 255, 0], [255, 255, 255]]])
    deep = np.array([[0, 2570, 30000, 65535]], np.uint16)   # 16-bit: round(v / 257)
    assert Image.open(io.BytesIO(encode(deep))).mode.startswith("I;16")
    np.testing.assert_array_equal(transforms.decode(encode(deep))[..., 0], [[0, 10, 117, 255]])
    la = np.array([[[200, 255], [0, 0]]], np.uint8)          # grey + alpha
    np.testing.assert_array_equal(transforms.decode(encode(la, mode="LA")),
                                  [[[200] * 3, [255] * 3]])
    cmyk = io.BytesIO()
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(cmyk, format="JPEG", quality=100)
    assert np.abs(transforms.decode(cmyk.getvalue()).astype(int) - [255, 0, 0]).max() < 8
    rgb = image(0)
    np.testing.assert_array_equal(transforms.decode(encode(rgb)), rgb)
    np.testing.assert_array_equal(transforms.decode(rgb[..., :1]), np.repeat(rgb[..., :1], 3, -1))


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"), (jpeg(0)[:200], "(?i)truncated"), (b"just some text", "undecodable"),
    (np.zeros((4, 4, 2), np.uint8), "shape"), (np.zeros((0, 4, 3), np.uint8), "zero")],
    ids=["empty", "truncated", "text", "two_channels", "zero_size"])
def test_undecodable_images_raise_broken_record(data, reason):
    with pytest.raises(BrokenRecord, match=reason):
        transforms.decode(data)


# ---------------------------------------------------------------------------------------------
# Local pairs with every broken case


def write_pairs(root):
    """pairs.jsonl with 3 good rows and 8 broken ones; returns (path, good captions)."""
    (root / "img").mkdir()
    (root / "img/a.png").write_bytes(encode(image(1)))
    (root / "img/b.jpg").write_bytes(jpeg(2))
    (root / "img/c.png").write_bytes(encode(image(3)))
    (root / "img/empty.jpg").write_bytes(b"")
    (root / "img/truncated.jpg").write_bytes(jpeg(4)[:300])
    (root / "img/text.jpg").write_text("I am not a picture")
    rows = [{"image": "img/a.png", "caption": "a png"},
            {"image": "img/missing.jpg", "caption": "missing file"},
            {"image": "img/b.jpg", "caption": ["a jpeg", "", "another"], "long_caption": "long"},
            {"image": "img/empty.jpg", "caption": "empty file"},
            {"image": "img/truncated.jpg", "caption": "truncated jpeg"},
            {"image": "img/text.jpg", "caption": "text named jpg"},
            {"image": "img/a.png", "caption": "   "},
            {"image": "img/a.png", "caption": 42},
            "not json at all",
            {"image": "img/a.png", "caption": [1, 2]},
            {"image": "img/c.png", "caption": "the third"}]
    path = root / "pairs.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n")
    return path, ["a png", "a jpeg", "the third"]


def test_pairs_jsonl_skips_and_counts_every_broken_row(tmp_path):
    path, good = write_pairs(tmp_path)
    source = pipeline.make_source(str(tmp_path), "eval", DATA_CFG, 16, "config.data.eval")
    assert isinstance(source, sources.PairsSource) and len(source) == 11   # the directory form
    record = source[2]
    assert isinstance(record["image"], bytes) and record["captions"] == ("a jpeg", "another")
    assert record["long_caption"] == "long"

    result = pipeline.eval_records(source)
    assert [r["caption"] for r in result.records] == good
    assert result.skipped == 8
    assert all(r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8
               for r in result.records)
    reasons = " | ".join(result.reasons).lower()
    for expected in ("missing.jpg: missing file", "empty.jpg: empty file",
                     "text.jpg: undecodable image",
                     "truncated.jpg: undecodable image (oserror: truncated",
                     "empty caption", "caption is a int", "invalid json", "without strings"):
        assert expected in reasons, expected
    assert len(result.reasons) == 8


def test_pairs_csv_with_list_captions(tmp_path):
    (tmp_path / "x.png").write_bytes(encode(image(5)))
    (tmp_path / "y.jpg").write_bytes(jpeg(6))
    (tmp_path / "pairs.csv").write_text(
        'image,caption,long_caption\n'
        'x.png,"[""a cat"", ""a small cat""]",a long description\n'
        'y.jpg,"a dog, sitting",\n'
        'y.jpg,"[not json",\n')
    source = sources.open_source(str(tmp_path / "pairs.csv"), "config.data.train")
    assert len(source) == 3
    assert source[0]["captions"] == ("a cat", "a small cat")
    assert source[0]["long_caption"] == "a long description"
    assert source[1]["captions"] == ("a dog, sitting",) and "long_caption" not in source[1]
    assert source[2]["caption"] == "[not json"   # not a list: the text itself
    with pytest.raises(ValueError, match="header with 'image' and 'caption'"):
        (tmp_path / "bad.csv").write_text("path,text\nx.png,a\n")
        sources.open_source(str(tmp_path / "bad.csv"))


def test_class_folders(tmp_path):
    for name, seeds in (("golden_retriever", (1, 2)), ("apple", (3,)), ("cat", (4,))):
        (tmp_path / name).mkdir()
        for s in seeds:
            (tmp_path / name / f"{s}.png").write_bytes(encode(image(s)))
    (tmp_path / "cat" / "README.txt").write_text("not a record")
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"")
    source = sources.open_source(str(tmp_path), "config.eval.zeroshot")
    assert isinstance(source, sources.ClassFolderSource)
    assert source.class_names == ("apple", "cat", "golden retriever")
    assert len(source) == 5                          # README.txt is no record; broken.jpg is
    labels = [source[i]["label"] for i in range(len(source)) if i != 2]
    assert labels == [0, 1, 2, 2]
    assert source[4]["caption"] == "golden retriever"
    with pytest.raises(BrokenRecord, match="broken.jpg: empty file"):
        source[2]
    assert pipeline.class_names(source) == source.class_names


# ---------------------------------------------------------------------------------------------
# Tar shards


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root):
    root.mkdir()
    with tarfile.open(root / "shard-0.tar", "w") as tar:
        add(tar, "s/000.jpg", jpeg(10))
        add(tar, "s/000.txt", b"first caption")
        add(tar, "s/001.png", encode(image(11)))
        add(tar, "s/001.json", json.dumps({"captions": ["second", "2nd"],
                                           "long_caption": "the second"}).encode())
        add(tar, "s/002.jpg", jpeg(12)[:250])            # a broken member: truncated jpeg
        add(tar, "s/002.txt", b"truncated")
        add(tar, "s/003.jpg", jpeg(13))                  # no caption member
        add(tar, "s/004.cls", b"7")                      # not a sample
    with tarfile.open(root / "shard-1.tar", "w") as tar:
        add(tar, "005.webp", encode(image(14), "WEBP", lossless=True))
        add(tar, "005.txt", b"fifth")
        add(tar, "006.jpg", jpeg(15))
        add(tar, "006.json", b"{broken json")
        add(tar, "007.jpg", jpeg(16))
        add(tar, "007.txt", b"seventh")
    # a copy cut in the middle of its last member (007.txt)
    data = (root / "shard-1.tar").read_bytes()
    (root / "shard-2.tar").write_bytes(data[:data.index(b"seventh") + 3])


def test_tar_shards_index_members_and_skip_broken_ones(tmp_path):
    write_shards(tmp_path / "shards")
    for spec in (str(tmp_path / "shards"), str(tmp_path / "shards/shard-*.tar")):
        source = sources.open_source(spec, "config.data.train")
        assert isinstance(source, sources.TarShardSource)
        assert len(source) == 4 + 3 + 3                  # 004.cls is no sample
    assert source[0]["caption"] == "first caption" and isinstance(source[0]["image"], bytes)
    assert source[1]["captions"] == ("second", "2nd") and source[1]["long_caption"] == "the second"
    np.testing.assert_array_equal(transforms.decode(source[1]["image"]), image(11))
    np.testing.assert_array_equal(transforms.decode(source[4]["image"]), image(14))

    result = pipeline.eval_records(source, transform=transforms.EvalTransform(8))
    assert [r["caption"] for r in result.records] == ["first caption", "second", "fifth",
                                                      "seventh", "fifth"]
    # 002 truncated jpeg, 003 no caption, 006 bad json (twice: shards 1 and 2), 007 cut short
    assert result.skipped == 5, result.reasons
    assert "cut short" in " ".join(result.reasons) and "no caption" in " ".join(result.reasons)
    single = sources.open_source(str(tmp_path / "shards/shard-1.tar"))
    assert len(single) == 3 and single[2]["caption"] == "seventh"


def test_tar_source_survives_pickling(tmp_path):
    import pickle
    write_shards(tmp_path / "shards")
    source = sources.open_source(str(tmp_path / "shards"))
    source[0]
    copy = pickle.loads(pickle.dumps(source))
    assert copy[4]["caption"] == "fifth" and copy._fds.keys() == {1}


# ---------------------------------------------------------------------------------------------
# tfds (mock data: nothing is downloaded)


def test_tfds_coco_captions_source_and_batch():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=6):
        source = pipeline.make_source("tfds:coco_captions/train", "train", DATA_CFG, 16,
                                      "config.data.train")
        assert len(source) == 6 and source.class_names is None
        record = source[0]
        assert record["image"].dtype == np.uint8 and record["image"].ndim == 3
        assert len(record["captions"]) > 1 and record["caption"] == record["captions"][0]
        assert all(isinstance(c, str) and c for c in record["captions"])
        collate = pipeline.Collate(synthetic.WordTokenizer(8), (0.5,) * 3, (0.5,) * 3)
        batch = next(iter(pipeline.train_dataset(source, collate, 4, seed=0)))
    assert batch["pixel_values"].shape == (4, 16, 16, 3)
    assert batch["input_ids"].shape == (4, 8) and batch["skipped"].tolist() == [0] * 4
    assert -1 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1


def test_tfds_classification_labels_and_class_names():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=5):
        source = sources.open_source("tfds:cifar100/test", "config.eval.zeroshot")
        assert len(source.class_names) == 100     # mock metadata: names "0".."99"
        records = pipeline.eval_records(source, transform=transforms.EvalTransform(8)).records
    assert len(records) == 5
    for r in records:
        assert 0 <= r["label"] < 100 and r["caption"] == source.class_names[r["label"]]
        assert r["image"].shape == (8, 8, 3)
    assert sources.human("aquarium_fish") == "aquarium fish"


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_forms_name_the_key_and_list_the_known_ones(tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"x")
    for spec in ("s3://bucket/pairs.jsonl", str(tmp_path / "data.parquet")):
        with pytest.raises(ValueError, match=r"config\.data\.train.*tfds:<name>/<split>"):
            pipeline.make_source(spec, "train", DATA_CFG, 16, "config.data.train")
    with pytest.raises(FileNotFoundError, match=r"config\.data\.eval.*nowhere"):
        sources.open_source(str(tmp_path / "nowhere"), "config.data.eval")
    with pytest.raises(ValueError, match="tfds:<name>/<split>"):
        sources.open_source("tfds:coco_captions", "config.data.train")
    with pytest.raises(ValueError, match="unknown synthetic dataset"):
        pipeline.make_source("synthetic:nope", "train", DATA_CFG, 16, "config.data.train")


def test_a_source_without_a_usable_row_is_an_error_naming_it(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": "gone.jpg", "caption": "x"}) + "\n" +
                     json.dumps({"image": "e.jpg", "caption": "y"}) + "\n" +
                     json.dumps({"image": "e.jpg", "caption": ""}) + "\n")
    with pytest.raises(ValueError, match=f"{pairs}.*none of its 3 rows"):
        sources.open_source(str(pairs))
    (tmp_path / "classes/a").mkdir(parents=True)
    (tmp_path / "classes/a/x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="classes: no non-empty image"):
        sources.open_source(str(tmp_path / "classes"))
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars/0.tar", "w") as tar:
        add(tar, "0.jpg", jpeg(0))
        add(tar, "0.txt", b"  ")
    with pytest.raises(ValueError, match="tars: none of its 1 samples"):
        sources.open_source(str(tmp_path / "tars"))


# ---------------------------------------------------------------------------------------------
# Normalisation constants


def test_normalization_from_the_checkpoint_or_the_config(tmp_path):
    data_cfg = SimpleNamespace(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    clip = {"image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(clip))
    mean, std = transforms.normalization(SimpleNamespace(checkpoint=str(tmp_path)), data_cfg)
    assert mean == tuple(clip["image_mean"]) and std == tuple(clip["image_std"])
    assert pipeline.normalization is transforms.normalization
    for checkpoint in ("", str(tmp_path / "no_such_dir"), "someone/not-cached-model"):
        assert transforms.normalization(SimpleNamespace(checkpoint=checkpoint), data_cfg) == (
            (0.5,) * 3, (0.5,) * 3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5],
                                                                  "image_std": [0.0]}))
    with pytest.raises(ValueError, match="image_std"):
        transforms.normalization(SimpleNamespace(checkpoint=str(tmp_path)), data_cfg)
