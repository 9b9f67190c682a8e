"""Pixel normalisation inside the jitted step, for batches that travel to the device as uint8.

    collate = pipeline.Collate(tokenizer, mean, std, normalize_on_host=False)  # uint8 pixels
    ...
    # inside the jitted train step / evaluator, before the model:
    pixels = normalize_on_device(batch["pixel_values"], mean, std)

A uint8 batch is a quarter of the bytes of float32 over the host-to-device link, and the host
does no float work per pixel (host normalisation costs ~0.66 ms per 224-px image, an eighth of
a 640x480 JPEG's whole decode-augment-collate time: BENCHMARKS.md). Float inputs are returned
unchanged, so a step that always calls this accepts batches from either Collate.

Imports only jax and numpy: the step's module may import it without the data stack.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def normalize_on_device(pixels, mean: Sequence[float], std: Sequence[float],
                        dtype=jnp.float32):
    """uint8 NHWC -> `dtype`, per channel (x/255 - mean) / std, as pipeline.normalize does on
    the host (float32 arithmetic, then cast); any float array passes through unchanged."""
    if jnp.issubdtype(pixels.dtype, jnp.floating):
        return pixels
    if pixels.dtype != jnp.uint8:
        raise TypeError(f"pixel_values of dtype {pixels.dtype}: expected uint8 (raw pixels) or "
                        f"a float dtype (already normalised)")
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if mean.shape != (pixels.shape[-1],) or std.shape != (pixels.shape[-1],):
        raise ValueError(f"mean {tuple(mean)} / std {tuple(std)}: need one value per channel "
                         f"of pixel_values {pixels.shape}")
    x = pixels.astype(jnp.float32) / jnp.float32(255.0)
    return ((x - mean) / std).astype(dtype)
