"""Zero-shot classification from precomputed features.

`class_embeddings` is CLIP's prompt ensemble: each class name is written into several templates
("a photo of a {}."; templates.py holds the template sets), the text features are L2-normalised,
averaged over templates and normalised again. `zeroshot_metrics` classifies each image by cosine
similarity to those class embeddings and reports top-k accuracy and the mean per-class recall (top-1 accuracy within each class present,
averaged over those classes: what unbalanced sets such as SVHN or FGVC report); k beyond the
number of classes is clipped, and ties are broken by class
index exactly as a stable argsort of −similarity would (lower index first), so results are
deterministic. Rows are processed in blocks, so memory stays O(block × classes).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from valign_jax.evaluation.geometry import l2_normalize
from valign_jax.evaluation.retrieval import stable_rank

_BLOCK_ELEMENTS = 1 << 22


def class_embeddings(text_features, num_classes: int, num_templates: int) -> np.ndarray:
    """(num_classes * num_templates, D) class-major text features -> (num_classes, D), unit rows.

    Row c * num_templates + t is class c written into template t.
    """
    t = l2_normalize(text_features, "text_features")
    if num_classes < 1 or num_templates < 1 or len(t) != num_classes * num_templates:
        raise ValueError(f"text_features has {len(t)} rows, expected num_classes * num_templates = "
                         f"{num_classes} * {num_templates} = {num_classes * num_templates}")
    mean = t.reshape(num_classes, num_templates, t.shape[1]).mean(axis=1)
    return l2_normalize(mean, "class embeddings (template means)")


def zeroshot_metrics(image_features, class_features, labels,
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ..., "mean_per_class_recall": ...} of images against class
    embeddings.

    image_features (N, D); class_features (C, D), e.g. from `class_embeddings` (normalised again
    here, harmlessly); labels: N integers in [0, C).
    """
    x = l2_normalize(image_features, "image_features")
    c = l2_normalize(class_features, "class_features")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"feature dims differ: image_features {x.shape} vs class_features {c.shape}")
    labels = np.asarray(labels)
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {len(x)} integers (one per image), got shape "
                         f"{labels.shape} dtype {labels.dtype}")
    bad = (labels < 0) | (labels >= len(c))
    if bad.any():
        raise ValueError(f"label {int(labels[np.argmax(bad)])} is outside [0, {len(c)}) "
                         f"({int(bad.sum())} bad labels)")
    if any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    ranks = np.empty(len(x), dtype=np.int64)
    step = max(1, _BLOCK_ELEMENTS // len(c))
    for start in range(0, len(x), step):
        ranks[start:start + step] = stable_rank(x[start:start + step] @ c.T, labels[start:start + step])
    metrics = {f"top{int(k)}": float(np.mean(ranks < min(int(k), len(c)))) for k in ks}
    present = np.unique(labels)
    metrics["mean_per_class_recall"] = float(np.mean(
        [np.mean(ranks[labels == k] == 0) for k in present]))
    return metrics
