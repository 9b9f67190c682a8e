"""Image↔text retrieval recall@k over precomputed features (cosine similarity).

Relevance is by key: text j is relevant to image i iff image_keys[i] == text_keys[j]. Keys may be
image ids (several captions per image: a 5k-image × 25k-caption COCO split) or caption strings
(an image whose caption equals another image's caption then counts as a hit for both). Without
keys, pair i ↔ i is the only relevant match.

R@k (i2t) = fraction of images with at least one relevant text among their top k; t2i likewise.
k beyond the gallery size is clipped to it. Ties are broken deterministically by gallery index:
the ranking is exactly a stable argsort of −similarity, so among equal similarities the lower
index ranks first. No sort is needed: the first relevant item's rank is counted directly, in row
blocks, so memory stays O(block × gallery) and an N×N×D array is never built.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from valign_jax.evaluation.geometry import l2_normalize

_BLOCK_ELEMENTS = 1 << 22  # ~32 MiB of float64 per similarity block


def stable_rank(sim: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Position of column target[r] in row r of `sim` under a stable argsort of −sim[r] (0-based)."""
    rows = np.arange(len(sim))
    s = sim[rows, target][:, None]
    above = (sim > s).sum(axis=1)
    tied_before = ((sim == s) & (np.arange(sim.shape[1])[None, :] < target[:, None])).sum(axis=1)
    return above + tied_before


def first_relevant_rank(queries, gallery, q_codes, g_codes) -> np.ndarray:
    """For each query, the 0-based rank of its best-ranked relevant gallery item."""
    ranks = np.empty(len(queries), dtype=np.int64)
    step = max(1, _BLOCK_ELEMENTS // len(gallery))
    for start in range(0, len(queries), step):
        sim = queries[start:start + step] @ gallery.T
        relevant = q_codes[start:start + step, None] == g_codes[None, :]
        # argmax returns the first (lowest-index) maximum: the relevant item a stable sort puts first.
        target = np.argmax(np.where(relevant, sim, -np.inf), axis=1)
        ranks[start:start + step] = stable_rank(sim, target)
    return ranks


def _codes(image_keys, text_keys, n_img: int, n_txt: int):
    """Integer codes for the keys (equal keys ↔ equal codes), checked against the feature sizes."""
    if image_keys is None and text_keys is None:
        if n_img != n_txt:
            raise ValueError(f"without keys, retrieval pairs image i with text i, so the sizes must "
                             f"match: {n_img} images vs {n_txt} texts; pass image_keys/text_keys")
        return np.arange(n_img), np.arange(n_txt)
    if image_keys is None or text_keys is None:
        raise ValueError("pass both image_keys and text_keys, or neither")
    image_keys, text_keys = list(image_keys), list(text_keys)
    if len(image_keys) != n_img or len(text_keys) != n_txt:
        raise ValueError(f"keys must match the features: {len(image_keys)} image_keys for {n_img} "
                         f"images, {len(text_keys)} text_keys for {n_txt} texts")
    table: dict = {}
    img = np.array([table.setdefault(k, len(table)) for k in image_keys], dtype=np.int64)
    txt = np.array([table.setdefault(k, len(table)) for k in text_keys], dtype=np.int64)
    for what, codes, other, name in (("images", img, txt, "text"), ("texts", txt, img, "image")):
        orphan = ~np.isin(codes, other)
        if orphan.any():
            first = (image_keys if what == "images" else text_keys)[int(np.argmax(orphan))]
            raise ValueError(f"{int(orphan.sum())} {what} have no relevant {name} (no equal key), "
                             f"e.g. key {first!r}; recall would be undefined for them")
    return img, txt


def retrieval_metrics(image_features, text_features, image_keys=None, text_keys=None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways: {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ...} for each k in ks.

    image_features (N_img, D), text_features (N_txt, D), L2-normalised here. image_keys/text_keys:
    hashables (ids or caption strings) deciding relevance; default pairs i ↔ i (needs N_img == N_txt).
    Every image needs at least one relevant text and vice versa, else ValueError.
    """
    x = l2_normalize(image_features, "image_features")
    y = l2_normalize(text_features, "text_features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: image_features {x.shape} vs text_features {y.shape}")
    if any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    img_codes, txt_codes = _codes(image_keys, text_keys, len(x), len(y))
    i2t = first_relevant_rank(x, y, img_codes, txt_codes)
    t2i = first_relevant_rank(y, x, txt_codes, img_codes)
    out = {}
    for direction, ranks, gallery in (("i2t", i2t, len(y)), ("t2i", t2i, len(x))):
        for k in ks:
            out[f"{direction}_r{int(k)}"] = float(np.mean(ranks < min(int(k), gallery)))
    return out
