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
Anything that cannot be decoded (empty, truncated, not an image, a decompression bomb) raises
`BrokenRecord`: the pipeline skips and counts such records, it never stops for them.

Every random choice comes from the `np.random.Generator` passed in (grain's `random_map` gives
one per record, derived from the seed and the record's position), so a stream is a pure function
of its seed. The training augmentation follows LiLT: RandomResizedCrop(scale=(0.2, 1.0),
ratio=(3/4, 4/3)), horizontal flip with p=0.5, then RandAugment(num_ops=2, magnitude=7) over
GEOMETRIC operations only — colour operations would change what a caption says ("a red car"):

    identity, rotate, shear_x, shear_y, translate_x, translate_y

with torchvision's magnitudes on its 31-bin scale (magnitude 7: 7 degrees, shear 0.07, translate
0.106 of the side), each applied with a random sign. Pixels an operation uncovers are filled
with the image's mean colour (a pure-colour image therefore stays exactly that colour).
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
from PIL import Image, ImageOps


class BrokenRecord(Exception):
    """A record that cannot be used (missing or undecodable image, no usable caption): the
    pipeline drops it and counts it."""


RESAMPLE = Image.Resampling.BICUBIC
GEOMETRIC_OPS = ("identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_NUM_BINS = 31  # torchvision's RandAugment scale: magnitude m of 30 -> linspace(0, max, 31)[m]
_MAX = {"rotate": 30.0, "shear_x": 0.3, "shear_y": 0.3, "translate_x": 150.0 / 331.0,
        "translate_y": 150.0 / 331.0}


# ---------------------------------------------------------------------------------------------
# Decoding


def decode(data) -> np.ndarray:
    """Encoded bytes, an array or a PIL image -> uint8 (H, W, 3) RGB; BrokenRecord if it can't."""
    return np.asarray(to_rgb_image(data))


def to_rgb_image(data) -> Image.Image:
    """Like `decode`, as a PIL RGB image (what the transforms work on)."""
    if isinstance(data, Image.Image):
        return _pil_to_rgb(data)
    if isinstance(data, np.ndarray):
        return Image.fromarray(_array_to_rgb(data))
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise BrokenRecord("empty image data")
        try:
            image = Image.open(io.BytesIO(data))  # in memory: nothing to close
            image.load()  # decode now: truncation shows here, not later
            if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation other than upright
                image = ImageOps.exif_transpose(image)
            return _pil_to_rgb(image)
        except BrokenRecord:
            raise
        except Exception as err:  # untrusted bytes: whatever PIL raises means "not usable"
            raise BrokenRecord(f"undecodable image ({type(err).__name__}: {err})") from None
    raise BrokenRecord(f"image of unsupported type {type(data).__name__}")


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
    uniformly, at `magnitude` of 30 with a random sign. Uncovered pixels get the mean colour."""
    unknown = set(ops) - set(GEOMETRIC_OPS)
    if unknown:
        raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; known: {GEOMETRIC_OPS}")
    fill = tuple(int(round(v)) for v in np.asarray(image).reshape(-1, 3).mean(0))
    for _ in range(num_ops):
        op = ops[int(rng.integers(len(ops)))]
        if op == "identity":
            continue
        value = _MAX[op] * magnitude / (_NUM_BINS - 1)
        if rng.random() < 0.5:
            value = -value
        image = _apply(image, op, value, fill)
    return image


def _apply(image: Image.Image, op: str, value: float, fill) -> Image.Image:
    w, h = image.size
    if op == "rotate":
        return image.rotate(value, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    # PIL's AFFINE maps each output pixel (x, y) to the input (a x + b y + c, d x + e y + f);
    # shears act about the centre, as torchvision's do.
    matrix = {"shear_x": (1, value, -value * h / 2, 0, 1, 0),
              "shear_y": (1, 0, 0, value, 1, -value * w / 2),
              "translate_x": (1, 0, -value * w, 0, 1, 0),
              "translate_y": (1, 0, 0, 0, 1, -value * h)}[op]
    return image.transform(image.size, Image.Transform.AFFINE, matrix,
                           resample=Image.Resampling.BILINEAR, fillcolor=fill)


# ---------------------------------------------------------------------------------------------
# The transforms the pipeline applies


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Decode -> random resized crop to image_size -> horizontal flip -> geometric RandAugment."""
    image_size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    randaugment_ops: int = 2          # 0 turns RandAugment off
    randaugment_magnitude: int = 7

    def __post_init__(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale {self.scale}: need 0 < low <= high <= 1")
        if not 0 <= self.randaugment_magnitude <= _NUM_BINS - 1:
            raise ValueError(f"randaugment_magnitude={self.randaugment_magnitude}: need 0..30")

    def __call__(self, image, rng: np.random.Generator) -> np.ndarray:
        image = to_rgb_image(image)
        box = random_resized_crop_box(image.width, image.height, rng, self.scale, self.ratio)
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

    def __call__(self, image, rng: np.random.Generator | None = None) -> np.ndarray:
        image = to_rgb_image(image)
        box = centre_crop_box(image.width, image.height, self.crop_fraction)
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
