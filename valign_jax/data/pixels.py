"""Pixel normalisation on the devices, for batches that travel there as uint8.

Training batches leave the host as uint8 pixels (config.data.normalize_on_device, the
default) and are normalised once they are on the devices:

    collate = pipeline.Collate(tokenizer, mean, std, normalize_on_host=False)  # uint8 pixels
    to_device = DeviceNormalizer(mean, std)
    batch = to_device(sharding.global_batch(collate(records), mesh))

A uint8 batch is a quarter of the bytes of float32 over the host-to-device link, and the host
does no float work per pixel (host normalisation costs ~0.66 ms per 224-px image, an eighth of
a 640x480 JPEG's whole decode-augment-collate time: BENCHMARKS.md). Float inputs are returned
unchanged, so a step that always calls this accepts batches from either Collate.

Imports only jax and numpy: the step's module may import it without the data stack.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(C, 256) float32: row c holds (v/255 - mean[c]) / std[c] for v = 0..255, in float32.

    The host (pipeline.normalize) and the device (normalize_on_device) both look their values
    up in this one table, so a batch normalised on either side is the same bit for bit."""
    return _table(tuple(map(float, mean)), tuple(map(float, std)))


@functools.lru_cache(maxsize=8)
def _table(mean: tuple, std: tuple) -> np.ndarray:
    if len(mean) != len(std):
        raise ValueError(f"mean {mean} and std {std}: need one value of each per channel")
    values = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
    table = (values - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    table.flags.writeable = False  # shared by every caller through the cache
    return table


def normalize_on_device(pixels, mean: Sequence[float], std: Sequence[float],
                        dtype=jnp.float32):
    """uint8 NHWC -> `dtype`, per channel (x/255 - mean) / std, looked up in the table the host
    uses (identical float32 values, then cast); any float array passes through unchanged."""
    if jnp.issubdtype(pixels.dtype, jnp.floating):
        return pixels
    if pixels.dtype != jnp.uint8:
        raise TypeError(f"pixel_values of dtype {pixels.dtype}: expected uint8 (raw pixels) or "
                        f"a float dtype (already normalised)")
    table = normalize_table(mean, std)
    if table.shape[0] != pixels.shape[-1]:
        raise ValueError(f"mean {tuple(mean)} / std {tuple(std)}: need one value per channel "
                         f"of pixel_values {pixels.shape}")
    channel = jnp.arange(table.shape[0], dtype=jnp.int32)
    return jnp.asarray(table)[channel, pixels.astype(jnp.int32)].astype(dtype)


class DeviceNormalizer:
    """Normalises the uint8 `pixel_values` of a batch already on the devices (sharding kept),
    one small jitted call per batch; float batches pass through untouched.

        to_device = DeviceNormalizer(collate.mean, collate.std)
        batch = to_device(sharding.global_batch(local, mesh))
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)
        self._normalize = jax.jit(lambda p: normalize_on_device(p, self.mean, self.std))

    def __call__(self, batch: dict) -> dict:
        pixels = batch.get("pixel_values")
        if pixels is None or jnp.issubdtype(pixels.dtype, jnp.floating):
            return batch
        return {**batch, "pixel_values": self._normalize(pixels)}
