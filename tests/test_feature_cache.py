"""The feature cache for frozen towers (data/feature_cache.py): cached features are the towers'
pooled outputs; several captions per image; resuming recomputes only missing shards; stale or
incomplete caches are refused; reading back, sampling a caption and batching; and a DualEncoder
of FeaturesConfig towers reuses the full model's heads on the cached features."""

import shutil

import jax
import numpy as np
import pytest

from valign_jax import sharding
from valign_jax.data import feature_cache as fc
from valign_jax.data import pipeline, synthetic
from valign_jax.models.dual_encoder import DualEncoder
from valign_jax.models.registry import preset

N, SHARD, BATCH, MAX_CAPTIONS = 40, 16, 8, 4           # 3 shards: 16, 16, 8 rows
MANIFEST = {"image": "vit_tiny", "text": "bert_tiny", "pooling": ["cls_mean", "mean"],
            "image_size": 32, "max_length": 40, "source": "synthetic:shapes/eval"}


class Source:
    """Synthetic eval records; every third has only its one `caption` (no `captions`)."""

    def __init__(self, long_caption=True):
        self.base = synthetic.SyntheticImageText(split="eval", num_examples=N, image_size=32)
        self.long_caption = long_caption

    def __len__(self):
        return N

    def __getitem__(self, i):
        record = dict(self.base[i])
        if i % 3 == 0:
            del record["captions"]
        if not self.long_caption:
            del record["long_caption"]
        return record


def captions_of(record):
    return list(record.get("captions", (record["caption"],)))[:MAX_CAPTIONS]


@pytest.fixture(scope="module")
def setup():
    model = DualEncoder(preset("vit_tiny", pooling="cls_mean"), preset("bert_tiny", pooling="mean"),
                        projection_dim=16)
    params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs())["params"]
    collate = pipeline.Collate(synthetic.WordTokenizer(max_length=40), (0.5,) * 3, (0.5,) * 3)
    return model, params, collate, sharding.make_mesh(1, 1)


def build(setup, out_dir, source=None, manifest=MANIFEST):
    model, params, collate, mesh = setup
    return fc.cache_features(model, params, source or Source(), collate, out_dir, manifest,
                             mesh=mesh, batch_size=BATCH, shard_size=SHARD,
                             max_captions=MAX_CAPTIONS, progress=False)


@pytest.fixture(scope="module")
def cache(setup, tmp_path_factory):
    return build(setup, tmp_path_factory.mktemp("cache") / "features")


def load_all(cache_dir):
    shards = [dict(np.load(fc.shard_path(cache_dir, k))) for k in range(3)]
    return {key: np.concatenate([s[key] for s in shards]) for key in shards[0]}


def test_cached_features_are_the_towers_pooled_outputs(setup, cache):
    model, params, collate, _ = setup
    source = Source()
    records = [source[i] for i in range(N)]
    apply = lambda fn, *args: np.asarray(model.apply({"params": params}, *args, method=fn))
    tok = lambda texts: collate.tokenizer(texts)
    image = apply(fc.image_features, collate(records)["pixel_values"])
    long = tok([r["long_caption"] for r in records])
    long = apply(fc.text_features, long["input_ids"], long["attention_mask"])

    cached = load_all(cache)
    assert [s.name for s in sorted(cache.glob("*.npz"))] == [f"shard-0000{k}.npz" for k in range(3)]
    np.testing.assert_array_equal(cached["index"], np.arange(N))
    assert cached["image"].dtype == cached["text"].dtype == np.float32
    assert cached["text"].shape == (N, MAX_CAPTIONS, 64) and cached["image"].shape == (N, 128)
    np.testing.assert_allclose(cached["image"], image, atol=1e-5)
    np.testing.assert_allclose(cached["long_text"], long, atol=1e-5)
    expected_num = [1 if i % 3 == 0 else MAX_CAPTIONS for i in range(N)]  # 6 paraphrases, cut
    np.testing.assert_array_equal(cached["num_captions"], expected_num)
    t = tok([c for r in records for c in captions_of(r)])
    texts = apply(fc.text_features, t["input_ids"], t["attention_mask"])
    for i, num in enumerate(expected_num):
        text, texts = texts[:num], texts[num:]
        np.testing.assert_allclose(cached["text"][i, :num], text, atol=1e-5)
        assert not cached["text"][i, num:].any()  # unused caption slots are zeros

    manifest = fc.read_manifest(cache)
    assert manifest == {**MANIFEST, "count": N, "shard_size": SHARD, "num_shards": 3,
                        "image_dim": 128, "text_dim": 64, "max_captions": MAX_CAPTIONS,
                        "has_long_caption": True, "format_version": 1}


def test_resume_recomputes_only_missing_shards(setup, cache, tmp_path, monkeypatch, caplog):
    out = tmp_path / "features"
    write = fc._write_shard

    def interrupted(path, arrays):  # the run dies after writing its first shard
        write(path, arrays)
        raise KeyboardInterrupt
    monkeypatch.setattr(fc, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(setup, out)
    monkeypatch.setattr(fc, "_write_shard", write)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.npz"]
    with pytest.raises(FileNotFoundError, match="2 of 3 shards missing.*--mode=cache_features"):
        fc.check_manifest(out, MANIFEST)

    encoded = []
    encode = fc._encode_batch
    monkeypatch.setattr(fc, "_encode_batch", lambda *a: encoded.append(1) or encode(*a))
    first_mtime = fc.shard_path(out, 0).stat().st_mtime_ns
    with caplog.at_level("INFO"):
        build(setup, out)
    assert len(encoded) == 3  # shard 1: two batches of 8, shard 2: one; shard 0 untouched
    assert fc.shard_path(out, 0).stat().st_mtime_ns == first_mtime
    assert "1 of 3 shards already complete on disk" in caplog.text
    fresh = load_all(cache)
    for key, value in load_all(out).items():
        np.testing.assert_array_equal(value, fresh[key], err_msg=key)

    # A deleted shard comes back; a complete cache computes nothing.
    fc.shard_path(out, 1).unlink()
    encoded.clear()
    build(setup, out)
    assert len(encoded) == 2
    build(setup, out)
    assert len(encoded) == 2
    np.testing.assert_array_equal(np.load(fc.shard_path(out, 1))["text"], fresh["text"][16:32])


def test_a_cache_built_with_other_settings_is_refused(setup, cache, tmp_path):
    out = tmp_path / "features"
    shutil.copytree(cache, out)
    with pytest.raises(ValueError) as err:
        build(setup, out, manifest={**MANIFEST, "image": "dinov2_tiny"})
    assert "image: cache has 'vit_tiny', this run has 'dinov2_tiny'" in str(err.value)
    with pytest.raises(ValueError, match="has_long_caption: cache has True, this run has False"):
        build(setup, out, source=Source(long_caption=False))

    assert fc.check_manifest(cache, {"image": "vit_tiny", "max_length": 40})["count"] == N
    with pytest.raises(ValueError) as err:
        fc.check_manifest(cache, {"image": "vit_tiny", "max_length": 77, "dtype": "bfloat16"})
    message = str(err.value)
    assert "max_length: cache has 40, config says 77" in message
    assert "dtype: cache has '<missing>', config says 'bfloat16'" in message
    assert "image:" not in message
    with pytest.raises(FileNotFoundError, match="no feature cache there"):
        fc.check_manifest(tmp_path / "nowhere", MANIFEST)
    fc.shard_path(out, 2).unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00002\.npz.*rerun --mode=cache_features"):
        fc.CachedFeatures(out)


def test_cached_features_source_sampling_and_batches(cache):
    ds = fc.CachedFeatures(cache, max_open_shards=2)
    cached = load_all(cache)
    assert len(ds) == N
    for i in (0, 15, 16, 39, -1):
        record = ds[i]
        row = i % N
        assert record["index"] == row and record["num_captions"] == cached["num_captions"][row]
        np.testing.assert_array_equal(record["image_features"], cached["image"][row])
        np.testing.assert_array_equal(record["text_features"], cached["text"][row])
        np.testing.assert_array_equal(record["long_text_features"], cached["long_text"][row])
    assert len(ds._open) == 2  # least recently used shard closed
    with pytest.raises(IndexError):
        ds[N]

    def sampled(seed):
        rng = np.random.default_rng(seed)
        return [fc.sample_caption(ds[i], rng)["text_features"] for i in range(N)]
    a, b = sampled(0), sampled(0)
    np.testing.assert_array_equal(a, b)
    assert a[0].shape == (64,)
    chosen = [[np.array_equal(a[i], c) for c in cached["text"][i]].index(True) for i in range(N)]
    assert all(j < cached["num_captions"][i] for i, j in enumerate(chosen))
    assert len(set(chosen)) > 1

    rng = np.random.default_rng(1)
    batch = fc.collate_features([fc.sample_caption(ds[i], rng) for i in range(8)])
    assert {k: v.shape for k, v in batch.items()} == {
        "image_features": (8, 128), "text_features": (8, 64), "long_text_features": (8, 64)}
    unsampled = fc.collate_features([ds[i] for i in range(3)])  # first caption each
    np.testing.assert_array_equal(unsampled["text_features"], cached["text"][:3, 0])

    import pickle
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[5]["image_features"], ds[5]["image_features"])


def test_heads_on_cached_features_equal_the_full_model(setup, cache):
    model, params, collate, _ = setup
    image_cfg, text_cfg = fc.feature_configs(cache)
    assert (image_cfg.dim, image_cfg.modality, text_cfg.dim, text_cfg.modality) == (
        128, "image", 64, "text")
    heads = DualEncoder(image_cfg, text_cfg, projection_dim=16)
    head_params = {k: v for k, v in params.items() if k not in ("vision_model", "text_model")}
    ds = fc.CachedFeatures(cache)
    batch = fc.collate_features([ds[i] for i in range(10)])
    out = heads.apply({"params": head_params}, batch["image_features"], batch["text_features"])

    records = [Source()[i] for i in range(10)]
    first = collate.tokenizer([captions_of(r)[0] for r in records])
    full = model.apply({"params": params}, collate(records)["pixel_values"], first["input_ids"],
                       first["attention_mask"])
    np.testing.assert_allclose(out["image"], full["image"], atol=1e-5)
    np.testing.assert_allclose(out["text"], full["text"], atol=1e-5)
    assert out["logit_scale"] == full["logit_scale"]


def test_sail_caches_and_trains_from_a_pairs_file_with_a_broken_row(tmp_path):
    """SAIL's cache over a user's pairs.jsonl (images as files, one of them missing): the
    records are decoded and eval-transformed as evaluation does, the broken row is skipped
    (the cache's readers see the 7 usable pairs), and two steps train from the cache."""
    import json
    from PIL import Image
    from valign_jax import frozen_towers, train
    from valign_jax.data import feature_cache as fc
    from train_helpers import tiny_config
    rows = []
    for i in range(8):
        name = f"{i}.png"
        if i != 3:  # row 3 names a file that is not there
            Image.fromarray(np.full((40, 48, 3), 30 * i, np.uint8)).save(tmp_path / name)
        rows.append({"image": name, "caption": f"a picture number {i}",
                     "long_caption": f"a longer description of picture number {i}"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config("sail", steps=2, batch_size=4)
    config.data.train = config.data.eval = str(tmp_path / "pairs.jsonl")
    config.eval.zeroshot = ""
    config.eval.batch_size = 4
    final = train.train_and_evaluate(config, tmp_path / "run")
    assert final["step"] == 2 and np.isfinite(final["train/loss"])
    cache = fc.CachedFeatures(frozen_towers.cache_dir(config, "train", tmp_path / "run"))
    assert len(cache) == 7 and 3 not in [cache[i]["index"] for i in range(len(cache))]
    assert all(cache[i]["num_captions"] >= 1 for i in range(len(cache)))
