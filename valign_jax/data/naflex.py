"""SigLIP 2 NaFlex inputs: an image at its own aspect ratio as a sequence of patches within a
patch budget, as Hugging Face's Siglip2ImageProcessor makes them.

    batch = naflex_batch(images, patch_size=16, max_patches=256)   # uint8 H×W×3 arrays
    model.apply(variables, batch, method=model.encode_image)       # a siglip2 DualEncoder

Each image is resized (PIL bilinear, on uint8, as the processor does) to the largest size with
both sides multiples of the patch size whose patch grid (h, w) fits the budget at the image's
aspect ratio, scaled to [0, 1] then normalised by (mean, std), cut into p×p patches flattened
(row, column, channel), and padded to `max_patches` patches. The batch holds `pixel_values`
(B, max_patches, 3·p²) float32, `spatial_shapes` (B, 2) int32 = (h, w) and
`pixel_attention_mask` (B, max_patches) int32 (1: a real patch).

The training pipeline (data/pipeline.py) feeds square images of one size; a NaFlex tower takes
those as well (every image then has the same grid). This module serves evaluation and custom
loops at native aspect ratios.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

MAX_UPSCALE = 100.0   # the processor searches scales up to 100×


def naflex_size(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """(height, width) in pixels to resize an image to: the largest scale s (at most 100) for
    which ceil(s·height/p)·ceil(s·width/p) patches fit in `max_patches`, each side at least one
    patch. The grid only changes where s·side/p crosses an integer, so the candidates are
    exactly those crossings, checked in integer arithmetic."""
    if min(height, width, patch_size, max_patches) < 1:
        raise ValueError(f"naflex_size({height}, {width}, patch_size={patch_size}, "
                         f"max_patches={max_patches}): every value must be >= 1")

    def grid(num, den):   # patches per side at scale s = num/den (·p per side's pixels)
        return (max(1, -(-height * num // (den * patch_size))),
                max(1, -(-width * num // (den * patch_size))))

    # Scale k·p/side puts exactly k patches along that side; the best scale is one of these.
    best = None
    for side in (height, width):
        for k in range(1, max_patches + 1):
            if k * patch_size > MAX_UPSCALE * side:
                break
            h, w = grid(k * patch_size, side)
            if h * w > max_patches:
                break
            if best is None or k * patch_size * best[1] > best[0] * side:
                best = (k * patch_size, side)
    # A scale the 100× cap stops before the next crossing.
    h, w = (max(1, math.ceil(MAX_UPSCALE * s / patch_size)) for s in (height, width))
    if h * w <= max_patches and (best is None or MAX_UPSCALE * best[1] > best[0]):
        return h * patch_size, w * patch_size
    if best is None:
        return patch_size, patch_size
    h, w = grid(*best)
    return h * patch_size, w * patch_size


def image_to_patches(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, C) -> (H/p · W/p, p·p·C), patches in row-major order, each (row, column, channel)."""
    height, width, channels = image.shape
    p = patch_size
    grid = image.reshape(height // p, p, width // p, p, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape((height // p) * (width // p), p * p * channels)


def naflex_inputs(image: np.ndarray, patch_size: int, max_patches: int,
                  mean: Sequence[float] = (0.5, 0.5, 0.5),
                  std: Sequence[float] = (0.5, 0.5, 0.5)) -> dict[str, np.ndarray]:
    """One uint8 (H, W, 3) image -> {"pixel_values" (max_patches, 3·p²), "spatial_shapes" (2,),
    "pixel_attention_mask" (max_patches,)}."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"naflex_inputs takes a uint8 H×W×3 image, got {image.dtype} "
                         f"{image.shape}")
    height, width = naflex_size(image.shape[0], image.shape[1], patch_size, max_patches)
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    pixels = (resized.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) \
        / np.asarray(std, np.float32)
    patches = image_to_patches(pixels, patch_size)
    count = patches.shape[0]
    padded = np.zeros((max_patches, patches.shape[1]), np.float32)
    padded[:count] = patches
    mask = np.zeros((max_patches,), np.int32)
    mask[:count] = 1
    return {"pixel_values": padded,
            "spatial_shapes": np.asarray((height // patch_size, width // patch_size), np.int32),
            "pixel_attention_mask": mask}


def naflex_batch(images, patch_size: int, max_patches: int, mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5)) -> dict[str, np.ndarray]:
    """naflex_inputs of each image, stacked: the dict a NaFlex tower takes as its pixels."""
    rows = [naflex_inputs(image, patch_size, max_patches, mean, std) for image in images]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}
