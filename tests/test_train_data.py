"""Training on a user's own files and from the feature cache, through train_and_evaluate."""

import json

import numpy as np
import pytest
from PIL import Image

import valign_jax
from valign_jax import frozen_towers, train
from valign_jax.data import synthetic
from valign_jax.models import FeaturesConfig

from train_helpers import tiny_config


def write_pairs(directory, records, broken=()):
    """pairs.jsonl with PNG/JPEG images of synthetic records, plus broken rows."""
    directory.mkdir(parents=True)
    rows = []
    for i, record in enumerate(records):
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(record["image"]).save(directory / name)
        rows.append({"image": name, "caption": list(record["captions"])})
    rows.extend(broken)
    (directory / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return directory / "pairs.jsonl"


def test_trains_on_local_pairs_and_reports_zero_shot_on_class_folders(tmp_path):
    source = synthetic.SyntheticImageText("train", num_examples=40, image_size=32)
    records = [source[i] for i in range(40)]
    (tmp_path / "empty.png").write_bytes(b"")
    train_file = write_pairs(tmp_path / "train", records[:24], broken=[
        {"image": "missing.png", "caption": "a small red circle on the left"},
        {"image": "img0.jpg", "caption": ""}])
    eval_file = write_pairs(tmp_path / "test", records[24:])
    for i, record in enumerate(records):  # <root>/<class name>/<image>
        folder = tmp_path / "classes" / synthetic.CLASS_NAMES[record["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(record["image"]).save(folder / f"{i}.png")

    config = tiny_config("clip", steps=4)
    config.data.train, config.data.eval = str(train_file), str(eval_file)
    config.eval.zeroshot = str(tmp_path / "classes")
    final = train.train_and_evaluate(config, tmp_path / "run")

    assert 0 <= final["zeroshot/classes/top1"] <= final["zeroshot/classes/top5"] <= 1
    assert np.isfinite(final["retrieval/t2i_r1"])
    # 4 steps of 8 read all 26 rows at least once: both broken ones were skipped and counted
    assert final["data/skipped_examples"] >= 2


def test_sail_trains_from_the_feature_cache_without_towers(tmp_path):
    config = tiny_config("sail", steps=2)
    assert config.data.feature_cache == "feature_cache"  # relative: inside the workdir
    # The first run builds the cache (the towers run once), then trains from it.
    final = train.train_and_evaluate(config, tmp_path / "run")
    assert (tmp_path / "run/feature_cache/train/manifest.json").is_file()
    assert np.isfinite(final["retrieval/i2t_r1"]) and np.isfinite(final["train/loss"])
    model, params, _ = valign_jax.load_trained(tmp_path / "run")
    assert isinstance(model.image_config, FeaturesConfig)
    assert isinstance(model.text_config, FeaturesConfig)
    assert "vision_model" not in params and "text_model" not in params  # no tower weights

    # A shared cache (absolute path) made under another config is refused, never overwritten.
    frozen_towers.cache_all(config, tmp_path / "elsewhere")
    config.data.feature_cache = str(tmp_path / "elsewhere/feature_cache")
    config.model.text.max_length = 20
    with pytest.raises(ValueError, match="max_length: cache has 40, config says 20"):
        train.train_and_evaluate(config, tmp_path / "other")


def test_sail_with_tower_checkpoints_caches_their_features_and_trains_the_heads(tmp_path):
    import transformers

    import tiny_hf
    transformers.FlaxViTModel(tiny_hf.vit_config(), seed=0).save_pretrained(tmp_path / "vit")
    transformers.FlaxBertModel(tiny_hf.bert_config(), seed=0).save_pretrained(tmp_path / "bert")
    vocab = tmp_path / "bert/vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                *synthetic.VOCABULARY]))
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path / "bert")

    config = tiny_config("sail", steps=2)
    config.model.image.checkpoint = str(tmp_path / "vit")
    config.model.text.checkpoint = str(tmp_path / "bert")
    config.model.text.max_length = 16  # the tiny BERT's position table
    final = train.train_and_evaluate(config, tmp_path / "run")
    assert np.isfinite(final["train/loss"]) and np.isfinite(final["retrieval/t2i_r1"])
    manifest = json.loads((tmp_path / "run/feature_cache/train/manifest.json").read_text())
    assert manifest["image_checkpoint"] == str(tmp_path / "vit")
    assert manifest["image_dim"] == 2 * 32 and manifest["text_dim"] == 32  # cls_mean, mean
