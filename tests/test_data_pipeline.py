"""The training stream over local data: transforms (shapes, determinism, geometric-only
RandAugment), batches that count the broken records they skipped exactly, the same stream for
the same seed, a restored iterator continuing the exact stream (threads and worker processes,
with broken rows), and an error rather than a hang when nothing decodes."""

import io
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from valign_jax.data import pipeline, sources, transforms

MEAN, STD = (0.5,) * 3, (0.5,) * 3
BROKEN = {2: "missing", 3: "text", 7: "caption", 8: "missing", 9: "text", 13: "caption"}
N = 16


def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class IndexTokenizer:
    """Captions are row numbers; the "token" is that number, so batches show which rows they
    hold."""

    def __call__(self, texts):
        ids = np.asarray([[int(t.split()[-1])] for t in texts], np.int32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """pairs.jsonl of N rows; the rows in BROKEN are broken in the way named there."""
    def image(path, rng):
        size = tuple(rng.integers(12, 40, 2))
        path.with_suffix(".png").write_bytes(png(rng.integers(0, 256, (*size, 3),
                                                             dtype=np.uint8)))
        return path.with_suffix(".png")
    return write_pairs(tmp_path_factory.mktemp("pairs"), image)


@pytest.fixture(scope="module")
def jpeg_pairs(tmp_path_factory):
    """Like `pairs`, with JPEGs of 60-200 px: large enough for the 16-px transforms to decode
    them at 1/2, 1/4 or 1/8 scale."""
    def image(path, rng):
        size = tuple(rng.integers(60, 200, 2))
        smooth = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
            size[::-1], Image.BILINEAR)
        smooth.save(path.with_suffix(".jpg"), quality=90)
        return path.with_suffix(".jpg")
    return write_pairs(tmp_path_factory.mktemp("jpeg_pairs"), image)


def write_pairs(root, write_image):
    """N rows in root/pairs.jsonl, image i written by write_image(root / str(i), rng_i) (it
    returns the file's path); the rows in BROKEN get a missing file, a text file or an empty
    caption."""
    rows = []
    for i in range(N):
        file = write_image(root / str(i), np.random.default_rng(i))
        kind = BROKEN.get(i)
        if kind == "missing":
            file.unlink()
        elif kind == "text":
            file.write_text("not an image")
        caption = "" if kind == "caption" else [f"row {i}", f"image {i}"]
        rows.append({"image": file.name, "caption": caption})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root / "pairs.jsonl"


def local_source(path, image_size=16):
    source = sources.open_source(str(path), "config.data.train")
    source.train_transform = transforms.TrainTransform(image_size)
    source.eval_transform = transforms.EvalTransform(image_size)
    return source


def stream(source, batch, seed=0, **kwargs):
    collate = pipeline.Collate(IndexTokenizer(), MEAN, STD)
    return iter(pipeline.train_dataset(source, collate, batch, seed, **kwargs))


def expected_batches(seed, batch, count, num_workers=0):
    """(rows, skipped) of the first `count` batches, replayed from grain's shuffle order: worker
    w of W reads stream positions w, w + W, ...; batches alternate between the workers."""
    order = grain.MapDataset.range(N).shuffle(seed=seed).repeat(None)
    workers = max(num_workers, 1)
    positions = [iter(range(w, 10 ** 9, workers)) for w in range(workers)]
    out = []
    for k in range(count):
        rows, skipped, pending = [], [], 0
        while len(rows) < batch:
            index = order[next(positions[k % workers])]
            if index in BROKEN:
                pending += 1
            else:
                rows.append(index), skipped.append(pending)
                pending = 0
        out.append((rows, skipped))
    return out


def rows_of(batch):
    return batch["input_ids"][:, 0].tolist(), batch["skipped"].tolist()


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# Transforms


@pytest.mark.parametrize("shape", [(10, 50), (50, 10), (7, 7), (120, 90)])
def test_transforms_give_the_model_size(shape):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for data in (image, png(image)):
        out = transforms.TrainTransform(24)(data, np.random.default_rng(1))
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8
        assert transforms.EvalTransform(24)(data).shape == (24, 24, 3)


def test_train_transform_is_a_function_of_the_generator():
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    t = transforms.TrainTransform(16)
    runs = [t(image, np.random.default_rng(seed)) for seed in (5, 5, 6, 7)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2]) and not np.array_equal(runs[2], runs[3])


def test_randaugment_is_geometric_only():
    colour = (37, 180, 222)
    plain = Image.new("RGB", (20, 20), colour)
    for op in transforms.GEOMETRIC_OPS:     # every op, both signs: the colour stays exactly
        for seed in range(6):
            out = transforms.rand_augment(plain, np.random.default_rng(seed), 2, 7, ops=(op,))
            assert (np.asarray(out) == colour).all(), op
    for seed in range(20):                  # the whole training transform too
        out = transforms.TrainTransform(12)(np.asarray(plain), np.random.default_rng(seed))
        assert (out == colour).all()
    # ...while every op but identity really moves a structured image
    structured = Image.fromarray(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((8, 8), np.uint8))
                                 [..., None].repeat(3, -1))
    for op in transforms.GEOMETRIC_OPS:
        moved = transforms.rand_augment(structured, np.random.default_rng(0), 1, 7, ops=(op,))
        assert np.array_equal(moved, structured) == (op == "identity"), op
    with pytest.raises(ValueError, match="unknown RandAugment ops"):
        transforms.rand_augment(plain, np.random.default_rng(0), ops=("solarize",))


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = transforms.random_resized_crop_box(100, 80, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 80
        assert 0.19 <= w * h / 8000 <= 1.0 and 0.73 <= w / h <= 1.37


def test_eval_transform_takes_the_centre():
    image = np.zeros((10, 30, 3), np.uint8)
    image[:, :10, 0] = image[:, 10:20, 1] = image[:, 20:, 2] = 255   # red | green | blue
    out = transforms.EvalTransform(10)(image).astype(int)
    assert np.abs(out[:, 1:-1] - [0, 255, 0]).max() <= 2


# ---------------------------------------------------------------------------------------------
# The stream


def test_batches_count_the_broken_records_they_skipped_exactly(pairs):
    source = local_source(pairs)
    it = stream(source, batch=4, seed=3)
    batches = [next(it) for _ in range(12)]   # 4.8 epochs: every kind of broken row, repeatedly
    assert [rows_of(b) for b in batches] == [tuple(e) for e in expected_batches(3, 4, 12)]
    assert sum(int(b["skipped"].sum()) for b in batches) >= 6 * 4
    for b in batches:
        assert b["pixel_values"].shape == (4, 16, 16, 3) and b["skipped"].dtype == np.int32


def test_same_seed_same_batches_other_seed_other_batches(pairs):
    source = local_source(pairs)
    a, b, c = stream(source, 4, seed=1), stream(source, 4, seed=1), stream(source, 4, seed=2)
    for _ in range(5):
        first, second, other = next(a), next(b), next(c)
        assert_same(first, second)
    assert not np.array_equal(first["pixel_values"], other["pixel_values"])


def test_restore_mid_stream_continues_exactly(pairs, tmp_path):
    source = local_source(pairs)
    it = stream(source, 4, seed=0)
    for _ in range(3):
        next(it)
    manager = ocp.CheckpointManager(tmp_path, item_handlers={"data": pipeline.iterator_handler()})
    manager.save(3, args=ocp.args.Composite(data=pipeline.iterator_save_args(it)))
    manager.wait_until_finished()
    continued = [next(it) for _ in range(5)]
    assert any(b["skipped"].sum() for b in continued), "the test should cross broken rows"

    restored = stream(source, 4, seed=0)
    manager.restore(3, args=ocp.args.Composite(data=pipeline.iterator_restore_args(restored)))
    for expected in continued:
        assert_same(next(restored), expected)


def test_jpeg_stream_at_reduced_scale_is_seeded_and_restores_exactly(jpeg_pairs, tmp_path):
    """JPEGs decoded at reduced scale, batches kept uint8 for the device: the same seed gives the
    same batches, broken rows are counted as replayed from the shuffle order, and a state saved
    mid-epoch restores the exact rest of the stream."""
    source = local_source(jpeg_pairs)
    collate = pipeline.Collate(IndexTokenizer(), MEAN, STD, normalize_on_host=False)

    def uint8_stream():
        return iter(pipeline.train_dataset(source, collate, 4, 0))

    a, b = uint8_stream(), uint8_stream()
    first = [next(a) for _ in range(3)]
    for batch in first:
        assert_same(batch, next(b))
        assert batch["pixel_values"].dtype == np.uint8
    state = a.get_state()                       # after 3 batches of 4: mid-epoch 1 (16 rows)
    continued = [next(a) for _ in range(4)]
    assert [rows_of(x) for x in first + continued] == [tuple(e) for e in
                                                      expected_batches(0, 4, 7)]
    restored = uint8_stream()
    restored.set_state(state)
    for expected in continued:
        assert_same(next(restored), expected)


def test_worker_processes_count_skips_and_restore_exactly(pairs):
    source = local_source(pairs)
    it = stream(source, 3, seed=4, num_workers=2)
    try:
        first = [next(it) for _ in range(4)]
        state = it.get_state()
        continued = [next(it) for _ in range(4)]
    finally:
        it.close()
    assert [rows_of(b) for b in first + continued] == [
        tuple(e) for e in expected_batches(4, 3, 8, num_workers=2)]
    restored = stream(source, 3, seed=4, num_workers=2)
    try:
        restored.set_state(state)
        for expected in continued:
            assert_same(next(restored), expected)
    finally:
        restored.close()


def test_nothing_decodable_is_an_error_not_a_hang(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_text("text, not an image")
    (tmp_path / "pairs.jsonl").write_text("\n".join(
        json.dumps({"image": f"{i}.jpg", "caption": f"row {i}"}) for i in range(3)))
    source = local_source(tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match=r"pairs\.jsonl: 50 broken records in a row"):
        next(stream(source, 2, max_broken_in_a_row=50))
    with pytest.raises(ValueError, match=r"pairs\.jsonl: no usable record among 3"):
        pipeline.eval_records(source)


def test_eval_records_keep_order_and_limit(pairs):
    source = local_source(pairs)
    result = pipeline.eval_records(source)
    good = [i for i in range(N) if i not in BROKEN]
    assert [r["caption"] for r in result.records] == [f"row {i}" for i in good]
    assert result.skipped == len(BROKEN)
    assert len(pipeline.eval_records(source, limit=3).records) == 3
    again = pipeline.eval_records(source)
    for a, b in zip(result.records, again.records):
        np.testing.assert_array_equal(a["image"], b["image"])
    view = pipeline.DecodedView(source)          # the same records, read lazily by index
    assert len(view) == N
    for i, record in zip(good, result.records):
        np.testing.assert_array_equal(view[i]["image"], record["image"])
    with pytest.raises(sources.BrokenRecord, match="missing file"):
        view[2]


def test_collate_uses_the_caption_when_a_record_has_no_long_caption():
    collate = pipeline.Collate(IndexTokenizer(), MEAN, STD, multi_positive=True)
    records = [{"image": np.zeros((4, 4, 3), np.uint8), "caption": "row 1", "long_caption": "x 9"},
               {"image": np.zeros((4, 4, 3), np.uint8), "caption": "row 2"}]
    batch = collate(records)
    assert batch["long_input_ids"][:, 0].tolist() == [9, 2]


def test_undecoded_sources_need_a_transform(pairs):
    source = sources.open_source(str(pairs))
    with pytest.raises(ValueError, match="undecoded images"):
        stream(source, 2)
