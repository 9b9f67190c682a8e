"""Image decoding and augmentation for the input pipeline: NumPy and PIL only, no TensorFlow.

    train = TrainTransform(224)            # random resized crop, flip, geometric RandAugment
    image = train(jpeg_bytes, rng)         # uint8 (224, 224, 3); rng: np.random.Generator
    image = EvalTransform(224)(jpeg_bytes) # shorter side to 224, centre crop

`decode` turns whatever a source holds (encoded bytes, a uint8 array, a PIL image) into RGB
uint8 H×W×3, whatever the file's mode:
  - grayscale (L, 1) and CMYK / YCbCr / LAB / HSV: converted by PIL;
  - alpha (RGBA, LA, and palette or grayscale images with a transparent colour): COMPOSITED ON
    WHITE (`rgb * a + 255 * (1 - a)`), so transparent logos and cut-outs do not turn black the way
    dropping the alpha channel would show whatever colour the transparent pixels happen to store;
  - 16-bit (I;16*, I): scaled to 8 bits, round(v / 257), rather than PIL's clipping at 255;
  - EXIF orientation is applied.
Anything that cannot be decoded (empty, truncated, not an image) raises `BrokenRecord`: the
pipeline skips and counts such records, it never stops for them. So does an image of more than
MAX_IMAGE_PIXELS (2**26 = 67.1 Mpx, 8192 × 8192), refused from its header before any pixel is
decoded: a decompression bomb (a few-kB PNG that inflates to 169 Mpx, 500 MB of RGB) must not
take a worker's memory. Image files are also capped in size before they are read
(sources.MAX_IMAGE_FILE_BYTES).

REDUCED-SCALE DECODING. A crop that is later shrunk to image_size need not be decoded at full
resolution: the transforms read the header first (size, EXIF orientation), draw the crop box,
then decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, via PIL's `draft`), the
largest factor that still leaves the box at least image_size pixels on each side, and resize
the box mapped into the smaller image. The random draws, the box and the output size are those
of a full decode; the pixels differ a little, because the image is averaged down before the
bicubic resize rather than by it (as PIL's `reducing_gap` or a box `reduce` first would).
Against a full decode of the same box, resized to 224 px, on the benchmark's photo-like JPEGs
(1/f spectrum, 640×480 and 1600×1200, quality 90; benchmarks/data_pipeline.py): mean absolute
difference 1.4 of 255 per channel value at factor 2 (worst crop 3.0) and 2.1 at factor 4
(worst 3.2), about what the JPEG compression itself changes (1.0–2.0 on the same crops). The
tests hold every reduced decode to REDUCED_DECODE_MAD = 4. Other formats decode in full;
`reduced_decode=False` on a transform decodes JPEGs in full too.

Every random choice comes from the `np.random.Generator` passed in (grain's `random_map` gives
one per record, derived from the seed and the record's position), so a stream is a pure function
of its seed. The training augmentation follows LiLT: RandomResizedCrop(scale=(0.2, 1.0),
ratio=(3/4, 4/3)), horizontal flip with p=0.5, then RandAugment(num_ops=2, magnitude=7) over
GEOMETRIC operations only — colour operations would change what a caption says ("a red car"):

    identity, rotate, shear_x, shear_y, translate_x, translate_y

with torchvision's magnitudes on its 31-bin scale (magnitude 7: 7 degrees, shear 0.07, translate
0.106 of the side), each applied with a random sign. The drawn operations are composed into one
affine map and the image resampled once (one bilinear interpolation, not one per operation);
pixels the map takes from outside the image are filled with the image's mean colour (a
pure-colour image therefore stays exactly that colour).
`normalization` picks the per-channel mean/std: the image checkpoint's preprocessor_config.json
when there is one, else the config's.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, ImageStat


class BrokenRecord(Exception):
    """A record that cannot be used (missing or undecodable image, no usable caption): the
    pipeline drops it and counts it."""


RESAMPLE = Image.Resampling.BICUBIC
GEOMETRIC_OPS = ("identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_NUM_BINS = 31  # torchvision's RandAugment scale: magnitude m of 30 -> linspace(0, max, 31)[m]
_MAX = {"rotate": 30.0, "shear_x": 0.3, "shear_y": 0.3, "translate_x": 150.0 / 331.0,
        "translate_y": 150.0 / 331.0}

# Images with more pixels are refused from their header, undecoded: 8192 x 8192 takes any camera
# photo, while the decoded RGB stays under 200 MB per image in flight.
MAX_IMAGE_PIXELS = 2 ** 26
# Mean absolute difference (of 255, per channel value) a reduced-scale decode may show against
# a full decode of the same box, after the resize to the model's size: at most 3.2 measured on
# the benchmark's JPEGs (module docstring); the tests hold reduced decodes to this bound.
REDUCED_DECODE_MAD = 4.0
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> whether the upright image's x and y axes run backwards through the stored
# pixels (2: mirrored, 3: rotated 180°, ...; 5-8 also swap width and height).
_REVERSED_AXES = {2: (True, False), 3: (True, True), 4: (False, True), 5: (False, False),
                  6: (True, False), 7: (True, True), 8: (False, True)}


# ---------------------------------------------------------------------------------------------
# Decoding


def decode(data) -> np.ndarray:
    """Encoded bytes, an array or a PIL image -> uint8 (H, W, 3) RGB; BrokenRecord if it can't."""
    return np.asarray(to_rgb_image(data))


def to_rgb_image(data) -> Image.Image:
    """Like `decode`, as a PIL RGB image (what the transforms work on)."""
    return _finish(open_image(data))


def open_image(data) -> Image.Image:
    """Encoded bytes -> a PIL image whose header only has been read (size, mode, EXIF: no pixel
    is decoded until `decode_box` or `to_rgb_image`); arrays -> RGB images; PIL images as they
    are. BrokenRecord for empty data, bytes that are no image, or more than MAX_IMAGE_PIXELS."""
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, np.ndarray):
        return Image.fromarray(_array_to_rgb(data))
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BrokenRecord(f"image of unsupported type {type(data).__name__}")
    if len(data) == 0:
        raise BrokenRecord("empty image data")
    try:
        image = Image.open(io.BytesIO(data))  # in memory: nothing to close
    except Image.DecompressionBombError as err:  # PIL's own limit (2x its warning size)
        raise BrokenRecord(f"image over the {MAX_IMAGE_PIXELS}-pixel cap "
                           f"(transforms.MAX_IMAGE_PIXELS), not decoded ({err})") from None
    except Exception as err:  # untrusted bytes: whatever PIL raises means "not usable"
        raise BrokenRecord(f"undecodable image ({type(err).__name__}: {err})") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise BrokenRecord(f"{width}x{height} image ({width * height / 1e6:.1f} Mpx) over the "
                           f"{MAX_IMAGE_PIXELS / 1e6:.1f}-Mpx cap (transforms.MAX_IMAGE_PIXELS), "
                           f"not decoded: a possible decompression bomb")
    return image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as shown, EXIF orientation applied, from its header."""
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def reduction_factor(box, min_size: int) -> int:
    """The largest of 8, 4, 2 that leaves both sides of `box` at least `min_size` pixels, else 1."""
    side = min(box[2] - box[0], box[3] - box[1])
    return next((f for f in (8, 4, 2) if side / f >= min_size), 1)


def decode_box(image: Image.Image, box, min_size: int, reduced: bool = True):
    """Decode an `open_image` result for resizing `box` (upright, full-resolution coordinates)
    to `min_size` -> (RGB image, the box in its coordinates).

    A JPEG is decoded at 1/`reduction_factor` scale (libjpeg's DCT scaling): stored pixel i of
    the scaled image covers full-resolution pixels [i f, (i + 1) f), so the box maps by / f,
    after an offset on the axes an EXIF orientation reverses (there the partial block at the
    image's end comes first). Other formats, or reduced=False, decode in full."""
    factor = reduction_factor(box, min_size) if reduced else 1
    if factor > 1:
        raw_width, raw_height = image.size
        try:
            drafted = image.draft(None, (raw_width // factor, raw_height // factor))
        except Exception as err:
            raise BrokenRecord(f"undecodable image ({type(err).__name__}: {err})") from None
        factor = round(raw_width / drafted[1][2]) if drafted else 1  # what libjpeg will do
    orientation = _orientation(image)
    image = _finish(image)
    if factor == 1:
        return image, tuple(box)
    reverse_x, reverse_y = _REVERSED_AXES.get(orientation, (False, False))
    upright_width, upright_height = (raw_height, raw_width) if orientation in (5, 6, 7, 8) else (
        raw_width, raw_height)
    dx = image.width * factor - upright_width if reverse_x else 0
    dy = image.height * factor - upright_height if reverse_y else 0
    left, top, right, bottom = box
    return image, ((left + dx) / factor, (top + dy) / factor, (right + dx) / factor,
                   (bottom + dy) / factor)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception as err:  # a corrupt EXIF block
        raise BrokenRecord(f"undecodable image ({type(err).__name__}: {err})") from None


def _finish(image: Image.Image) -> Image.Image:
    """Decode the pixels now (truncation shows here, not later), upright, as RGB."""
    try:
        image.load()
        if _orientation(image) in _REVERSED_AXES:
            image = ImageOps.exif_transpose(image)
        return _pil_to_rgb(image)
    except BrokenRecord:
        raise
    except Exception as err:  # untrusted bytes: whatever PIL raises means "not usable"
        raise BrokenRecord(f"undecodable image ({type(err).__name__}: {err})") from None


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise BrokenRecord("image with zero width or height")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        return Image.fromarray(_array_to_rgb(np.asarray(image)))
    if mode == "F":
        return Image.fromarray(_array_to_rgb(np.clip(np.asarray(image), 0, 255).astype(np.uint8)))
    if mode in ("P", "PA", "L", "1") and "transparency" in image.info or mode == "PA":
        image = image.convert("RGBA")
    if mode in ("LA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        return Image.fromarray(_over_white(np.asarray(image.convert("RGBA"))))
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8/uint16 arrays of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 RGB."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or array.ndim == 3 and array.shape[-1] not in (3, 4):
        raise BrokenRecord(f"image array of shape {array.shape}; expected (H, W[, 1|3|4])")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise BrokenRecord("image with zero width or height")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise BrokenRecord(f"image array of dtype {array.dtype}; expected uint8 or uint16")
        wide = np.clip(array.astype(np.int64), 0, 65535)
        array = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=-1)
    return _over_white(array) if array.shape[-1] == 4 else array


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 -> RGB uint8 composited on white, rounded."""
    rgb, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Geometry


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering `scale` of the area with aspect ratio in
    `ratio`: torchvision's RandomResizedCrop.get_params (10 tries, then a centre crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def centre_crop_box(width: int, height: int, crop_fraction: float = 1.0):
    """The centred square of side crop_fraction * shorter side, as a float box."""
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def rand_augment(image: Image.Image, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: int = 7, ops: Sequence[str] = GEOMETRIC_OPS) -> Image.Image:
    """RandAugment restricted to `ops` (geometric by default): `num_ops` operations, each drawn
    uniformly, at `magnitude` of 30 with a random sign. The drawn operations are composed into
    one affine map and the image is resampled once (bilinear): the geometry of applying them in
    turn, with one interpolation instead of two. Pixels the map takes from outside the image get
    the image's mean colour."""
    unknown = set(ops) - set(GEOMETRIC_OPS)
    if unknown:
        raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; known: {GEOMETRIC_OPS}")
    # Each op maps its output pixel to its input (PIL's AFFINE convention): op1 then op2 maps
    # a final pixel x to op1's input M1 (M2 x), so the composed map is M1 @ M2.
    matrix = np.eye(3)
    for _ in range(num_ops):
        op = ops[int(rng.integers(len(ops)))]
        if op == "identity":
            continue
        value = _MAX[op] * magnitude / (_NUM_BINS - 1)
        if rng.random() < 0.5:
            value = -value
        matrix = matrix @ _inverse_map(op, value, *image.size)
    if np.allclose(matrix, np.eye(3), rtol=0, atol=1e-12):
        return image
    # The mean colour from the histogram: exact, and a seventh of the time of a float mean.
    fill = tuple(int(round(v)) for v in ImageStat.Stat(image).mean[:3])
    return image.transform(image.size, Image.Transform.AFFINE, tuple(matrix[:2].ravel()),
                           resample=Image.Resampling.BILINEAR, fillcolor=fill)


def _inverse_map(op: str, value: float, w: int, h: int) -> np.ndarray:
    """3x3 map from an output pixel (x, y, 1) of `op` to its input pixel."""
    if op == "rotate":  # counter-clockwise by `value` degrees about the centre, as PIL rotates
        angle = -math.radians(value)
        cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
        cx, cy = w / 2, h / 2
        row = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    else:  # shears act about the centre, as torchvision's do
        row = {"shear_x": (1, value, -value * h / 2, 0, 1, 0),
               "shear_y": (1, 0, 0, value, 1, -value * w / 2),
               "translate_x": (1, 0, -value * w, 0, 1, 0),
               "translate_y": (1, 0, 0, 0, 1, -value * h)}[op]
    return np.asarray([row[:3], row[3:], (0, 0, 1)], np.float64)


# ---------------------------------------------------------------------------------------------
# The transforms the pipeline applies


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Decode (at reduced scale when the crop allows) -> random resized crop to image_size ->
    horizontal flip -> geometric RandAugment."""
    image_size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    randaugment_ops: int = 2          # 0 turns RandAugment off
    randaugment_magnitude: int = 7
    reduced_decode: bool = True       # JPEGs at 1/2, 1/4, 1/8 scale when the crop allows

    def __post_init__(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale {self.scale}: need 0 < low <= high <= 1")
        if not 0 <= self.randaugment_magnitude <= _NUM_BINS - 1:
            raise ValueError(f"randaugment_magnitude={self.randaugment_magnitude}: need 0..30")

    def __call__(self, image, rng: np.random.Generator) -> np.ndarray:
        image = open_image(image)  # the header: the box is drawn before any pixel is decoded
        box = random_resized_crop_box(*upright_size(image), rng, self.scale, self.ratio)
        image, box = decode_box(image, box, self.image_size, self.reduced_decode)
        image = image.resize((self.image_size, self.image_size), RESAMPLE, box=box)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment_ops:
            image = rand_augment(image, rng, self.randaugment_ops, self.randaugment_magnitude)
        return np.asarray(image)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Decode -> resize the shorter side to image_size / crop_fraction -> centre crop (CLIP's
    evaluation preprocessing at crop_fraction=1). Deterministic; `rng` is accepted and unused."""
    image_size: int
    crop_fraction: float = 1.0
    reduced_decode: bool = True       # JPEGs at 1/2, 1/4, 1/8 scale when the crop allows

    def __call__(self, image, rng: np.random.Generator | None = None) -> np.ndarray:
        image = open_image(image)
        box = centre_crop_box(*upright_size(image), self.crop_fraction)
        image, box = decode_box(image, box, self.image_size, self.reduced_decode)
        return np.asarray(image.resize((self.image_size, self.image_size), RESAMPLE, box=box))


def train_transform(image_size: int, augment=None) -> TrainTransform:
    """TrainTransform from a config's optional `data.augment` dict (keys: TrainTransform's
    fields); unknown keys fail listing the valid ones."""
    fields = dict(augment or {})
    valid = {f.name for f in dataclasses.fields(TrainTransform)} - {"image_size"}
    unknown = set(fields) - valid
    if unknown:
        raise ValueError(f"config.data.augment: unknown keys {sorted(unknown)}; known: "
                         f"{sorted(valid)}")
    for key in ("scale", "ratio"):
        if key in fields:
            fields[key] = tuple(float(v) for v in fields[key])
    return TrainTransform(image_size, **fields)


# ---------------------------------------------------------------------------------------------
# Normalisation constants


def normalization(image_tower_cfg, data_cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for `pipeline.normalize`: `image_mean` / `image_std` of the image
    checkpoint's preprocessor_config.json when the tower names a checkpoint that has one (a
    local directory, or a hub id already in the local Hugging Face cache: nothing is
    downloaded), else `data_cfg.image_mean` / `data_cfg.image_std`."""
    checkpoint = str(getattr(image_tower_cfg, "checkpoint", "") or "")
    file = _preprocessor_config(checkpoint) if checkpoint else None
    if file is not None:
        config = json.loads(file.read_text())
        if "image_mean" in config and "image_std" in config:
            mean, std = _channels(config["image_mean"], file), _channels(config["image_std"], file)
            if min(std) <= 0:
                raise ValueError(f"{file}: image_std {std} must be positive")
            return mean, std
    return tuple(map(float, data_cfg.image_mean)), tuple(map(float, data_cfg.image_std))


def _channels(values, file) -> tuple[float, ...]:
    values = (values,) if isinstance(values, (int, float)) else tuple(values)
    if len(values) not in (1, 3):
        raise ValueError(f"{file}: expected 1 or 3 per-channel values, got {values}")
    return tuple(float(v) for v in values) * (3 if len(values) == 1 else 1)


def _preprocessor_config(checkpoint: str) -> Path | None:
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        file = path / "preprocessor_config.json"
        return file if file.is_file() else None
    if checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1:
        return None
    try:  # a hub id: only what is already cached locally
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(checkpoint, "preprocessor_config.json")
    except Exception:  # no huggingface_hub, malformed id: fall back to the config's values
        return None
    return Path(cached) if isinstance(cached, str) else None
