"""What an evaluator hands the model for its images and texts.

An evaluator holds its data as decoded images (uint8 N×H×W×3) and caption strings. A model with
towers takes them as pixels (normalised one batch at a time, so a big split stays uint8 in host
memory) and token ids. A model that trains from cached tower features (SAIL) has no towers: its
"towers" take the frozen towers' pooled outputs, so the images and texts go through those towers
once, when the evaluator is built, and the evaluator keeps only their features (`tower_features`,
an object of the run that knows the towers and caches what they compute beside the training
features: frozen_towers.TowerFeatures). Either way the evaluator calls
`encoder.images(params, images, prepare)` and `encoder.texts(params, texts)` the same way.

    inputs = ModelInputs(collate)                    # a model with towers
    inputs = ModelInputs(collate, tower_features)    # a towerless model
    images, prepare = inputs.images(pixels)
    texts = inputs.texts(["a red circle", ...])
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


class ModelInputs:
    """Images and captions -> the inputs of the model's encode_image / encode_text."""

    def __init__(self, collate, tower_features=None):
        self.collate, self.tower_features = collate, tower_features

    @property
    def towerless(self) -> bool:
        """True when the model reads precomputed tower features."""
        return self.tower_features is not None

    def images(self, pixels: np.ndarray) -> tuple[np.ndarray, Callable | None]:
        """(encode_image's input rows, what to apply to each batch first)."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.dtype != np.uint8:
            raise ValueError(f"images: expected uint8 (N, H, W, 3) pixels, got {pixels.dtype} "
                             f"{pixels.shape}")
        if self.tower_features is not None:
            return self.tower_features.images(pixels), None
        from valign_jax.data.pipeline import normalize
        mean, std = self.collate.mean, self.collate.std
        return pixels, lambda batch: normalize(batch, mean, std)

    def texts(self, texts: Sequence[str]) -> dict:
        """encode_text's inputs: token ids and mask, or tower features with a dummy mask (a
        features "tower" ignores the mask)."""
        texts = [str(t) for t in texts]
        if self.tower_features is not None:
            features = self.tower_features.texts(texts)
            return {"input_ids": features,
                    "attention_mask": np.ones((len(features), 1), np.int32)}
        return self.collate.tokenizer(texts)
