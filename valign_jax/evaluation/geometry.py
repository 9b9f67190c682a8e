"""Geometry of the joint embedding space: modality gap, alignment and uniformity.

Definitions (docs/metrics.md, "Geometry"), all on L2-normalised features x̂ (images), ŷ (texts):
- gap             = ‖mean(x̂) − mean(ŷ)‖          (Liang et al., "Mind the Gap"; the paper's form)
- gap_sq_per_dim  = ‖mean(x̂) − mean(ŷ)‖² / D     (the CLIP-Refine official code's form)
- alignment       = mean_i ‖x̂_i − ŷ_i‖²          (Wang & Isola, α = 2; pairs i ↔ i)
- uniformity      = log mean_{i<j} exp(−2‖u_i − u_j‖²) over the union u of image and text features
                    (Wang & Isola, t = 2)
Both gap forms are reported because the paper and the official code disagree.

This module also holds `l2_normalize`, the input check every evaluation metric shares.
"""

from __future__ import annotations

import numpy as np

MAX_UNIFORMITY_POINTS = 4096
_UNIFORMITY_SEED = 0
_BLOCK_ELEMENTS = 1 << 22  # ~32 MiB of float64 per similarity block


def l2_normalize(x, name: str) -> np.ndarray:
    """Checks a (N, D) feature array and returns its rows L2-normalised, in float64.

    Raises ValueError, naming `name`, for a wrong rank, an empty array, non-finite rows or
    all-zero rows (which have no direction).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a (N, D) array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: empty features, shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} of {len(x)} rows are non-finite (NaN/inf), "
                         f"first at row {int(np.argmax(bad))}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise ValueError(f"{name}: {int(zero.sum())} of {len(x)} rows are all zeros and cannot be "
                         f"L2-normalised, first at row {int(np.argmax(zero))}")
    return x / norms


def uniformity(u: np.ndarray, max_points: int = MAX_UNIFORMITY_POINTS) -> float:
    """log mean_{i<j} exp(−2‖u_i − u_j‖²) for L2-normalised rows u (at least 2).

    With more than `max_points` rows, a fixed-seed random subset of `max_points` rows is used, so
    the value is deterministic and the cost stays O(max_points²) (computed in row blocks).
    """
    n = len(u)
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 points, got {n}")
    if n > max_points:
        idx = np.random.default_rng(_UNIFORMITY_SEED).choice(n, size=max_points, replace=False)
        u, n = u[np.sort(idx)], max_points
    total = 0.0
    step = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n - 1, step):
        block = u[start:start + step]
        sq = np.maximum(2.0 - 2.0 * block @ u.T, 0.0)  # ‖a − b‖² = 2 − 2 a·b for unit vectors
        upper = np.arange(n)[None, :] > np.arange(start, start + len(block))[:, None]
        total += np.exp(-2.0 * sq[upper]).sum()
    return float(np.log(total / (n * (n - 1) / 2)))


def geometry_metrics(image_features, text_features,
                     max_uniformity_points: int = MAX_UNIFORMITY_POINTS) -> dict[str, float]:
    """{"gap", "gap_sq_per_dim", "alignment", "uniformity"} for paired (N, D) features.

    Features are L2-normalised here; row i of each is one image–text pair, so both need the same
    N and D. Uniformity subsamples the 2N-point union to `max_uniformity_points` (see `uniformity`).
    """
    x = l2_normalize(image_features, "image_features")
    y = l2_normalize(text_features, "text_features")
    if x.shape != y.shape:
        raise ValueError(f"geometry metrics need paired features of one shape: image_features "
                         f"{x.shape} vs text_features {y.shape}")
    diff = x.mean(axis=0) - y.mean(axis=0)
    gap_sq = float(diff @ diff)
    return {
        "gap": float(np.sqrt(gap_sq)),
        "gap_sq_per_dim": gap_sq / x.shape[1],
        "alignment": float(((x - y) ** 2).sum(axis=1).mean()),
        "uniformity": uniformity(np.concatenate([x, y]), max_uniformity_points),
    }
