"""Frozen-tower features of evaluation data (zero-shot images and class prompts, few-shot and
compositional sets), cached beside a run's training features.

A run that trains from cached features (SAIL) has no towers, so everything it evaluates on goes
through the frozen towers once; these files keep what they computed, so the next evaluation,
a resumed run and `python -m valign_jax.evaluate` read it instead of running the towers again.

    <feature_cache>/sets/images-<sha256[:16]>/   features.npy (N, D) float32, manifest.json
    <feature_cache>/sets/texts-<sha256[:16]>/

A set is named by the SHA-256 of its content (the uint8 pixels with their shape, or the list of
strings), so different data never share a file. Its manifest holds what the towers were (the
same keys as the training cache's manifest: checkpoints, presets, pooling, dtype, image size,
caption length, normalisation) with the content's hash and row count; a set made under other
settings is refused with the differing keys named, as the training cache is. `features.npy`
is written first and the manifest last, each by an atomic rename, so a set with a manifest is
complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from valign_jax.data.feature_cache import MANIFEST, _differences, _jsonable, _write_json

FEATURES = "features.npy"


def pixels_digest(pixels: np.ndarray) -> str:
    pixels = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{pixels.dtype}{pixels.shape}".encode())
    h.update(memoryview(pixels).cast("B"))
    return h.hexdigest()


def texts_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


def _exists_everywhere(path: Path) -> bool:
    """Whether the set is on disk, as process 0 sees it: every process must then agree to run
    the towers (a collective computation) or not."""
    done = np.asarray([(path / MANIFEST).is_file()])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return bool(done[0])


def cached_features(directory, manifest: dict, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The features stored in `directory` if its manifest equals `manifest` (plus `dim`);
    else compute() them, store them (process 0) and return them. A directory made under other
    settings is refused (ValueError naming the keys)."""
    path = Path(directory)
    expected = _jsonable(manifest)
    if _exists_everywhere(path):
        stored = json.loads((path / MANIFEST).read_text())
        diffs = _differences(stored, expected, expected, "this run has")
        if diffs:
            raise ValueError(f"{path}: these cached tower features were made with other "
                             f"settings:\n  " + "\n  ".join(diffs) + "\ndelete the directory "
                             f"to recompute them")
        features = np.load(path / FEATURES)
        if len(features) != stored["count"]:
            raise ValueError(f"{path / FEATURES}: {len(features)} rows, its manifest says "
                             f"{stored['count']}; delete the directory to recompute it")
        return features
    features = np.asarray(compute(), np.float32)
    if len(features) != expected["count"]:
        raise ValueError(f"computed {len(features)} feature rows for {expected['count']} inputs")
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{FEATURES}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, features)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / FEATURES)
        _write_json(path / MANIFEST, {**expected, "dim": int(features.shape[-1])})
    return features
