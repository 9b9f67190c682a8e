"""Decoding for the input pipeline: a reduced-scale JPEG decode stays within its documented
pixel tolerance of a full decode (every EXIF orientation, sizes that are not multiples of the
scale), decompression bombs and oversized files are counted skips with a reason, RandAugment's
composed warp matches its operations applied in turn, and uint8 batches normalised on the device
equal the host's float batches."""

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from benchmarks.data_pipeline import photo_like_jpegs
from valign_jax.data import pipeline, pixels, sources, transforms

SIZE = 64


def jpeg(array, orientation=1, quality=90):
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality, exif=exif)
    return buffer.getvalue()


def resized(data, box, reduced):
    image, mapped = transforms.decode_box(transforms.open_image(data), box, SIZE, reduced)
    return image, np.asarray(image.resize((SIZE, SIZE), transforms.RESAMPLE, mapped), np.float32)


@pytest.fixture(scope="module")
def photos():
    """Four of the benchmark's photo-like JPEGs (640×480 and 1600×1200), as decoded arrays."""
    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            for _, _, data in photo_like_jpegs(4, seed=5)]


def test_reduced_decode_stays_within_its_tolerance_of_a_full_decode(photos):
    """For random crop boxes of the benchmark's images, the reduced decode really decodes fewer
    pixels (1/factor per side), and the resized crop differs from the full decode's by at most
    REDUCED_DECODE_MAD on average; a box shifted by 2% of its side (what a wrong box mapping
    would give) is far outside it."""
    rng = np.random.default_rng(0)
    seen = set()
    for array in photos:
        data, (height, width) = jpeg(array), array.shape[:2]
        for _ in range(6):
            box = transforms.random_resized_crop_box(width, height, rng)
            factor = transforms.reduction_factor(box, SIZE)
            seen.add(factor)
            small, reduced = resized(data, box, True)
            _, full = resized(data, box, False)
            assert small.size == (-(-width // factor), -(-height // factor))
            assert np.abs(reduced - full).mean() <= transforms.REDUCED_DECODE_MAD
    assert seen >= {2, 4, 8}, seen
    # The tolerance is tight enough to catch a box mapped wrongly by a few pixels.
    box = (300.0, 200.0, 1100.0, 1000.0)
    data = jpeg(photos[1])
    _, full = resized(data, box, False)
    shift = 0.02 * (box[2] - box[0])
    image, mapped = transforms.decode_box(transforms.open_image(data), box, SIZE, True)
    wrong = (mapped[0] + shift / 8, mapped[1], mapped[2] + shift / 8, mapped[3])
    off = np.asarray(image.resize((SIZE, SIZE), transforms.RESAMPLE, wrong), np.float32)
    assert np.abs(off - full).mean() > 2 * transforms.REDUCED_DECODE_MAD


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_decode_follows_the_exif_orientation(photos, orientation):
    """A JPEG whose EXIF orientation mirrors or turns it, with sides one more than a multiple
    of 8 (the scaled image's last block is partial, and comes first on a reversed axis): the
    reduced decode of a box on the upright image matches the full decode of that box."""
    stored = np.ascontiguousarray(photos[1][:1193, :1593])  # 1593 = 8 * 199 + 1
    data = jpeg(stored, orientation)
    upright = transforms.upright_size(transforms.open_image(data))
    assert upright == ((1193, 1593) if orientation >= 5 else (1593, 1193))
    rng = np.random.default_rng(orientation)
    for _ in range(3):
        box = transforms.random_resized_crop_box(*upright, rng, scale=(0.4, 1.0))
        assert transforms.reduction_factor(box, SIZE) == 8
        _, reduced = resized(data, box, True)
        _, full = resized(data, box, False)
        assert np.abs(reduced - full).mean() <= transforms.REDUCED_DECODE_MAD, orientation


def test_transforms_decode_at_reduced_scale_only_when_the_crop_allows(photos):
    """EvalTransform of a 640×480 JPEG at 224 px: the 480-px centre square allows factor 2 and
    nothing more, and the output stays within tolerance of the full decode; PNGs decode in full
    (the same pixels either way)."""
    box = transforms.centre_crop_box(640, 480)
    assert transforms.reduction_factor(box, 224) == 2
    assert transforms.reduction_factor(box, 241) == 1
    data = jpeg(photos[0])
    fast = transforms.EvalTransform(224)(data).astype(np.float32)
    exact = transforms.EvalTransform(224, reduced_decode=False)(data).astype(np.float32)
    assert 0 < np.abs(fast - exact).mean() <= transforms.REDUCED_DECODE_MAD
    buffer = io.BytesIO()
    Image.fromarray(photos[0]).save(buffer, "PNG")
    png = buffer.getvalue()
    np.testing.assert_array_equal(transforms.EvalTransform(224)(png),
                                  transforms.EvalTransform(224, reduced_decode=False)(png))


# ---------------------------------------------------------------------------------------------
# Decompression bombs and oversized files


def png_header_only(width, height):
    """A PNG that declares width × height grey pixels but holds one row of data: what a
    decompression bomb's header looks like, without the bomb."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [(13000, 13000), (9000, 7500), (20000, 10000)])
def test_images_over_the_pixel_cap_are_broken_records_before_decoding(side):
    """169 Mpx (under PIL's own error limit), 67.5 Mpx (just over ours) and 200 Mpx (over
    PIL's): each a BrokenRecord naming the cap, from the header alone."""
    data = png_header_only(*side)
    for transform in (transforms.TrainTransform(SIZE), transforms.EvalTransform(SIZE)):
        with pytest.raises(transforms.BrokenRecord, match="MAX_IMAGE_PIXELS"):
            transform(data, np.random.default_rng(0))
    with pytest.raises(transforms.BrokenRecord, match="MAX_IMAGE_PIXELS"):
        transforms.decode(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bombs_and_oversized_files_are_counted_skips(tmp_path, photos):
    """In a pairs.jsonl: a 169-Mpx PNG header and a 3 GB sparse file named .jpg (never read:
    its size is refused first) are skipped and counted with their reasons, by the training
    stream and by the evaluation records, while the good JPEGs pass."""
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(photos[0][:120, :160]))
    (tmp_path / "bomb.png").write_bytes(png_header_only(13000, 13000))
    with open(tmp_path / "huge.jpg", "wb") as f:
        f.truncate(3 * 2 ** 30)
    names = ["0.jpg", "bomb.png", "1.jpg", "huge.jpg", "2.jpg"]
    (tmp_path / "pairs.jsonl").write_text("\n".join(
        json.dumps({"image": n, "caption": f"row {i}"}) for i, n in enumerate(names)))
    source = sources.open_source(str(tmp_path / "pairs.jsonl"))
    source.train_transform = transforms.TrainTransform(SIZE)
    source.eval_transform = transforms.EvalTransform(SIZE)
    with pytest.raises(sources.BrokenRecord, match=r"3072 MiB image file, over the 256 MiB cap"):
        source[3]

    evaluated = pipeline.eval_records(source)
    assert [r["caption"] for r in evaluated.records] == ["row 0", "row 2", "row 4"]
    assert evaluated.skipped == 2
    assert any("MAX_IMAGE_PIXELS" in r for r in evaluated.reasons)
    assert any("MAX_IMAGE_FILE_BYTES" in r for r in evaluated.reasons)

    collate = pipeline.Collate(lambda texts: {"input_ids": np.asarray(
        [[int(t.split()[-1])] for t in texts], np.int32)}, (0.5,) * 3, (0.5,) * 3)
    stream = iter(pipeline.train_dataset(source, collate, 3, seed=0, threads=1))
    batches = [next(stream) for _ in range(5)]   # 15 good rows: 5 epochs, 10 skips
    assert sum(int(b["skipped"].sum()) for b in batches) in (10, 11, 12)
    assert all(set(b["input_ids"][:, 0]) <= {0, 2, 4} for b in batches)


def test_oversized_tar_members_are_skipped_unread(tmp_path, monkeypatch):
    """A tar member larger than the cap (lowered here to 2 kB) is a broken record; the small
    one next to it reads."""
    monkeypatch.setattr(sources, "MAX_IMAGE_FILE_BYTES", 2048)
    small = jpeg(np.full((8, 8, 3), 90, np.uint8))
    large = jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert len(small) < 2048 < len(large)
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for key, data in (("a", small), ("b", large)):
            for name, body in ((f"{key}.jpg", data), (f"{key}.txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    source = sources.open_source(str(tmp_path / "shard.tar"))
    assert source[0]["image"] == small
    with pytest.raises(sources.BrokenRecord, match=r"MAX_IMAGE_FILE_BYTES"):
        source[1]


# ---------------------------------------------------------------------------------------------
# RandAugment's single warp


def apply_in_turn(image, draws, fill=0):
    """The drawn (op, value) pairs applied one after another, each resampling the image (PIL's
    own `rotate` for rotations)."""
    for op, value in draws:
        if op == "rotate":
            image = image.rotate(value, resample=Image.Resampling.BILINEAR, fillcolor=fill)
        else:
            matrix = transforms._inverse_map(op, value, *image.size)
            image = image.transform(image.size, Image.Transform.AFFINE, tuple(matrix[:2].ravel()),
                                    resample=Image.Resampling.BILINEAR, fillcolor=fill)
    return image


def test_composed_randaugment_matches_the_operations_applied_in_turn(photos):
    """The drawn operations composed into one warp give the image PIL makes by applying them one
    after another, up to the second interpolation's blur, wherever no fill reaches; composing
    in the wrong order is far off."""
    image = Image.fromarray(photos[0][100:324, 200:424])
    wrong_order_checked = 0
    for seed in range(16):
        rng, draws = np.random.default_rng(seed), []
        for _ in range(2):  # rand_augment's draws: an op, then a sign unless it is identity
            op = transforms.GEOMETRIC_OPS[int(rng.integers(6))]
            if op != "identity":
                value = transforms._MAX[op] * 7 / 30 * (-1 if rng.random() < 0.5 else 1)
                draws.append((op, value))
        composed = np.asarray(transforms.rand_augment(image, np.random.default_rng(seed)),
                              np.float32)
        in_turn = np.asarray(apply_in_turn(image, draws), np.float32)
        inside = np.asarray(apply_in_turn(Image.new("L", image.size, 255), draws)) == 255
        assert inside.mean() > 0.5
        error = np.abs(composed - in_turn)[inside].mean()
        assert error <= 4.0, (seed, draws, error)
        if len(draws) == 2 and draws[0][0] != draws[1][0]:
            reverse = np.eye(3)
            for op, value in reversed(draws):
                reverse = reverse @ transforms._inverse_map(op, value, *image.size)
            wrong = np.asarray(image.transform(image.size, Image.Transform.AFFINE,
                                               tuple(reverse[:2].ravel()),
                                               resample=Image.Resampling.BILINEAR), np.float32)
            if "rotate" in dict(draws):  # rotation and a translation or shear do not commute
                assert np.abs(wrong - in_turn)[inside].mean() > 2 * error, (seed, draws)
                wrong_order_checked += 1
    assert wrong_order_checked


# ---------------------------------------------------------------------------------------------
# Normalising: host table, device function


def test_host_normalisation_equals_the_float_formula_and_the_device_function():
    """pipeline.normalize (a lookup table) equals (x/255 - mean)/std computed in float32 bit for
    bit, and so does pixels.normalize_on_device of the uint8 batch (the same table); it passes
    float batches through and refuses other dtypes and mismatched channel counts."""
    import jax
    import jax.numpy as jnp
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    expected = (images.astype(np.float32) / np.float32(255) - np.asarray(mean, np.float32)) \
        / np.asarray(std, np.float32)
    host = pipeline.normalize(images, mean, std)
    assert host.dtype == np.float32
    np.testing.assert_array_equal(host, expected)
    device = jax.jit(lambda x: pixels.normalize_on_device(x, mean, std))(jnp.asarray(images))
    assert device.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(device), expected)
    bf16 = pixels.normalize_on_device(jnp.asarray(images), mean, std, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(pixels.normalize_on_device(expected, mean, std), expected)
    with pytest.raises(TypeError, match="uint8"):
        pixels.normalize_on_device(jnp.asarray(images, jnp.int32), mean, std)
    with pytest.raises(ValueError, match="one value per channel"):
        pixels.normalize_on_device(jnp.asarray(images), (0.5,), (0.5,))


def test_collate_emits_uint8_for_the_device(photos):
    """Collate(normalize_on_host=False) keeps the stacked uint8 images; normalising them on the
    device gives the host Collate's batch bit for bit."""
    records = [{"image": photos[0][:16, :16], "caption": "row 1"},
               {"image": photos[1][:16, :16], "caption": "row 2"}]

    def tokenizer(texts):
        return {"input_ids": np.asarray([[len(t)] for t in texts], np.int32)}

    host = pipeline.Collate(tokenizer, (0.5,) * 3, (0.25,) * 3)(records)
    raw = pipeline.Collate(tokenizer, (0.5,) * 3, (0.25,) * 3, normalize_on_host=False)(records)
    assert raw["pixel_values"].dtype == np.uint8
    np.testing.assert_array_equal(raw["pixel_values"], np.stack([r["image"] for r in records]))
    np.testing.assert_array_equal(np.asarray(pixels.normalize_on_device(
        raw["pixel_values"], (0.5,) * 3, (0.25,) * 3)), host["pixel_values"])
    np.testing.assert_array_equal(raw["input_ids"], host["input_ids"])
