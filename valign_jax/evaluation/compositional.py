"""Compositional understanding over precomputed scores: does the model prefer the caption that
binds the words correctly to one with the same words bound differently?

Two forms, each scored by any function of (image, text) pairs, so the dual encoder's cosine and
a fusion model's re-ranking score go through the same code:

- Choice (SugarCrepe, ARO): each item is one image, its true caption and K >= 1 negatives
  (the count may differ between items). An item is correct when the true caption scores
  strictly higher than every negative; a tie is a failure, since a model that cannot tell the
  captions apart has not chosen. `accuracy` is the share of correct items.
- Groups (Winoground, Thrush et al. 2022): two images I0, I1 and two captions C0, C1, caption c
  belonging to image c. With s(c, i) the score of caption c against image i:
      text  = s(C0, I0) > s(C1, I0)  and  s(C1, I1) > s(C0, I1)   (each image picks its caption)
      image = s(C0, I0) > s(C0, I1)  and  s(C1, I1) > s(C1, I0)   (each caption picks its image)
      group = text and image
  each averaged over the groups. Chance is 1/4, 1/4 and 1/6.

A score function is called as score(image_index, text_index) with two equal-length integer
arrays and returns one float per pair (higher = better match), as the re-ranker's scores are.
`cosine_score` builds the dual encoder's from features. Everything is float64 NumPy; the keys of
the returned dicts carry no prefix (the caller writes compositional/<dataset>/<key>).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from valign_jax.evaluation.geometry import l2_normalize

Score = Callable[[np.ndarray, np.ndarray], np.ndarray]
PAIRS_PER_CALL = 4096   # a fusion head scores pairs in batches; this bounds one batch


def cosine_score(image_features, text_features) -> Score:
    """score(i, t) = cosine of image_features[i] and text_features[t] (rows L2-normalised here)."""
    x = l2_normalize(image_features, "image_features")
    y = l2_normalize(text_features, "text_features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: image_features {x.shape} vs text_features "
                         f"{y.shape}")

    def score(image_index, text_index):
        for name, index, n in (("image", image_index, len(x)), ("text", text_index, len(y))):
            if len(index) and (np.min(index) < 0 or np.max(index) >= n):
                raise ValueError(f"{name} index out of range [0, {n}): {np.min(index)} .. "
                                 f"{np.max(index)}")
        return np.einsum("pd,pd->p", x[image_index], y[text_index])
    return score


def score_pairs(score: Score, image_index, text_index) -> np.ndarray:
    """score over many pairs, PAIRS_PER_CALL at a time; checks what comes back."""
    image_index = np.asarray(image_index, np.int64)
    text_index = np.asarray(text_index, np.int64)
    out = np.empty(len(image_index), np.float64)
    for start in range(0, len(image_index), PAIRS_PER_CALL):
        stop = start + PAIRS_PER_CALL
        got = np.asarray(score(image_index[start:stop], text_index[start:stop]), np.float64)
        if got.shape != (len(image_index[start:stop]),):
            raise ValueError(f"score returned shape {got.shape} for "
                             f"{len(image_index[start:stop])} pairs; expected one float per pair")
        if not np.isfinite(got).all():
            raise ValueError(f"score returned {int((~np.isfinite(got)).sum())} non-finite values "
                             f"(NaN/inf) for pairs starting at {start}")
        out[start:stop] = got
    return out


# ---------------------------------------------------------------------------------------------
# Choice: one true caption against K negatives


def _ragged(negatives, n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A (N, K) array or N sequences -> (flat values, row lengths), each row non-empty."""
    if isinstance(negatives, np.ndarray) and negatives.ndim == 2:
        rows = list(negatives)
    else:
        rows = [np.asarray(r).reshape(-1) for r in negatives]
    if len(rows) != n:
        raise ValueError(f"{what}: {len(rows)} rows for {n} items")
    lengths = np.array([len(r) for r in rows], np.int64)
    if n and lengths.min() == 0:
        raise ValueError(f"{what}: item {int(np.argmin(lengths))} has no negatives")
    flat = np.concatenate(rows) if n else np.empty(0)
    return flat, lengths


def choice_accuracy(pos_scores, neg_scores) -> float:
    """Share of items whose true caption scores strictly above all of its negatives.

    pos_scores (N,); neg_scores (N, K), or N sequences of 1+ scores each (K may vary)."""
    pos = np.asarray(pos_scores, np.float64)
    if pos.ndim != 1 or not len(pos):
        raise ValueError(f"pos_scores: expected a non-empty (N,) array, got shape {pos.shape}")
    flat, lengths = _ragged(neg_scores, len(pos), "neg_scores")
    flat = flat.astype(np.float64)
    if not (np.isfinite(pos).all() and np.isfinite(flat).all()):
        raise ValueError("pos_scores/neg_scores hold non-finite values (NaN/inf)")
    best_negative = np.maximum.reduceat(flat, np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    return float(np.mean(pos > best_negative))


def choice_metrics(score: Score, image_index, positive, negatives) -> dict[str, float]:
    """{"accuracy": ...} of N items. Item n is image image_index[n] with true caption
    positive[n] and negative captions negatives[n] (text indices; a (N, K) array or N
    sequences). Every pair is scored once through `score`."""
    image_index = np.asarray(image_index, np.int64)
    positive = np.asarray(positive, np.int64)
    if image_index.ndim != 1 or positive.shape != image_index.shape or not len(image_index):
        raise ValueError(f"image_index and positive: expected equal non-empty (N,) arrays, got "
                         f"shapes {image_index.shape} and {positive.shape}")
    flat, lengths = _ragged(negatives, len(image_index), "negatives")
    flat = flat.astype(np.int64)
    n = len(image_index)
    scores = score_pairs(score, np.concatenate([image_index, np.repeat(image_index, lengths)]),
                         np.concatenate([positive, flat]))
    neg = np.split(scores[n:], np.cumsum(lengths)[:-1])
    return {"accuracy": choice_accuracy(scores[:n], neg)}


# ---------------------------------------------------------------------------------------------
# Winoground groups: two images, two captions


def winoground_scores(scores) -> dict[str, float]:
    """{"text", "image", "group"} from scores (G, 2, 2) with scores[g, c, i] = s(C_c, I_i)."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 3 or s.shape[1:] != (2, 2) or not len(s):
        raise ValueError(f"scores: expected a non-empty (G, 2, 2) array of s(caption, image), "
                         f"got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores hold non-finite values (NaN/inf)")
    c0i0, c0i1, c1i0, c1i1 = s[:, 0, 0], s[:, 0, 1], s[:, 1, 0], s[:, 1, 1]
    text = (c0i0 > c1i0) & (c1i1 > c0i1)
    image = (c0i0 > c0i1) & (c1i1 > c1i0)
    return {"text": float(text.mean()), "image": float(image.mean()),
            "group": float((text & image).mean())}


def group_score_tensor(score: Score, group_images, group_texts) -> np.ndarray:
    """(G, 2, 2) scores[g, c, i] = score(group_images[g, i], group_texts[g, c])."""
    images = np.asarray(group_images, np.int64)
    texts = np.asarray(group_texts, np.int64)
    if images.ndim != 2 or images.shape[1:] != (2,) or texts.shape != images.shape:
        raise ValueError(f"group_images and group_texts: expected equal (G, 2) index arrays, got "
                         f"shapes {images.shape} and {texts.shape}")
    # pairs in (g, c, i) order: image index varies fastest
    image_index = np.broadcast_to(images[:, None, :], (len(images), 2, 2)).reshape(-1)
    text_index = np.broadcast_to(texts[:, :, None], (len(texts), 2, 2)).reshape(-1)
    return score_pairs(score, image_index, text_index).reshape(len(images), 2, 2)


def group_metrics(score: Score, group_images, group_texts) -> dict[str, float]:
    """{"text", "image", "group"} of G groups: group g is images group_images[g] = (I0, I1) and
    captions group_texts[g] = (C0, C1), caption c true of image c."""
    return winoground_scores(group_score_tensor(score, group_images, group_texts))


def metric_names(kind: str) -> Sequence[str]:
    """The keys each form reports ("choice" or "groups")."""
    names = {"choice": ("accuracy",), "groups": ("text", "image", "group")}
    if kind not in names:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(names)}")
    return names[kind]
