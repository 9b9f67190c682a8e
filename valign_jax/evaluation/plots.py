"""Figures for alignment analyses: image and text embeddings in a plane that shows the modality
gap, and the per-layer LayerNorm shift of `ln_shift` (LiLT Fig. 4).

The embedding plot's axes are chosen for the gap, not for variance: the first is the direction
from the text centroid to the image centroid, the second the top principal component of what
is left once that direction is projected out. The centroids are then exactly the gap apart
along the first axis, whatever the gap's direction; on the top two principal components a gap
orthogonal to the spread within each modality falls out of the picture (a run with gap 0.437
drew its two centroids on top of each other).

matplotlib is imported inside the functions, and figures are drawn through the Agg canvas
directly rather than pyplot, so importing this module stays light and never switches the
backend of an interactive session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from valign_jax.evaluation.geometry import l2_normalize

MAX_POINTS = 2000   # per modality in the scatter; more only hides the structure and slows it
IMAGE_COLOR, TEXT_COLOR = "tab:blue", "tab:orange"


def pca_2d(image_features, text_features):
    """Projects the L2-normalised rows of both modalities onto the top-2 principal components of
    their centred union. Returns (image_2d (N, 2), text_2d (M, 2), explained_ratio (2,)), all
    float64; each component's sign makes its largest-magnitude loading positive, so the picture
    does not flip between runs or BLAS builds."""
    img, txt = _check_pair(image_features, text_features)
    union = np.concatenate([img, txt])
    centred = union - union.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    signs = np.sign(comps[np.arange(2), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    total = float((s ** 2).sum())
    # identical points have no variance to explain: report zeros rather than NaN
    ratio = (s[:2] ** 2) / total if total > 0 else np.zeros(2)
    proj = centred @ comps.T
    return proj[:len(img)], proj[len(img):], ratio


def _check_pair(image_features, text_features):
    img = l2_normalize(image_features, "image_features")
    txt = l2_normalize(text_features, "text_features")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_features has dimension {img.shape[1]} but text_features has "
                         f"{txt.shape[1]}")
    if img.shape[1] < 2:
        raise ValueError(f"image_features/text_features: need dimension >= 2 for a 2-D plot, "
                         f"got {img.shape[1]}")
    return img, txt


def gap_projection(image_features, text_features):
    """Projects the L2-normalised rows of both modalities, centred on their union's mean, onto
    (1) the unit vector from the text centroid to the image centroid and (2) the top principal
    component of the union with (1) projected out.

    Returns (image_2d (N, 2), text_2d (M, 2), variance_ratio (2,), gap) in float64: gap is
    ‖mean(image) − mean(text)‖ of the normalised rows, and the centroids of image_2d and
    text_2d differ by exactly (gap, 0). Without a gap (equal centroids) axis (1) is the top
    principal component instead. The second axis's sign makes its largest loading positive."""
    img, txt = _check_pair(image_features, text_features)
    union = np.concatenate([img, txt])
    centred = union - union.mean(axis=0)
    diff = img.mean(axis=0) - txt.mean(axis=0)
    gap = float(np.linalg.norm(diff))
    if gap > 1e-12:
        first = diff / gap
        rest = centred - np.outer(centred @ first, first)
        second = np.linalg.svd(rest, full_matrices=False)[2][0]
    else:  # no direction between the centroids: fall back to the top two components
        first, second = np.linalg.svd(centred, full_matrices=False)[2][:2]
        first = first * (np.sign(first[np.abs(first).argmax()]) or 1.0)
    second = second - (second @ first) * first     # exactly orthogonal despite rounding
    if np.linalg.norm(second) < 1e-6:   # nothing left beside the first axis: any orthogonal one
        second = np.eye(len(first))[np.abs(first).argmin()]
        second = second - (second @ first) * first
    second = second / np.linalg.norm(second)
    second = second * (np.sign(second[np.abs(second).argmax()]) or 1.0)
    proj = centred @ np.stack([first, second]).T
    total = float((centred ** 2).sum())
    ratio = (proj ** 2).sum(axis=0) / total if total > 0 else np.zeros(2)
    return proj[:len(img)], proj[len(img):], ratio, gap


def _output_path(path) -> Path:
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"path: expected a non-empty file path, got {path!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _new_figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def pca_plot(image_features, text_features, path, title: str = "") -> Path:
    """Scatter of `gap_projection` (at most MAX_POINTS per modality, a fixed-seed subsample)
    with each modality's centroid marked; writes a PNG to `path` (parent directories created)."""
    img, txt, ratio, gap = gap_projection(image_features, text_features)
    path = _output_path(path)
    rng = np.random.default_rng(0)
    fig = _new_figure((6, 5))
    ax = fig.add_subplot()
    for pts, color, label in ((img, IMAGE_COLOR, "image"), (txt, TEXT_COLOR, "text")):
        # centroids come from every point; only the drawing is subsampled
        centroid = pts.mean(axis=0)
        shown = pts[np.sort(rng.choice(len(pts), MAX_POINTS, replace=False))] \
            if len(pts) > MAX_POINTS else pts
        ax.scatter(shown[:, 0], shown[:, 1], s=6, alpha=0.5, color=color,
                   label=f"{label} (n={len(pts)}" + (f", {len(shown)} shown)"
                                                     if len(shown) < len(pts) else ")"))
        ax.scatter(*centroid, s=160, marker="X", color=color, edgecolor="black",
                   label=f"{label} centroid")
    first = (f"text → image centroid (gap {gap:.3f})" if gap > 1e-12
             else "PC1 (no gap between the centroids)")
    ax.set_xlabel(f"{first}, {100 * ratio[0]:.1f}% of variance")
    ax.set_ylabel(f"top PC of the rest, {100 * ratio[1]:.1f}% of variance")
    ax.set_title(title or "L2-normalised embeddings along the modality gap")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def ln_shift_plot(result, path) -> Path:
    """One panel per tower of an `ln_shift` result: L1 shift against layer, with the
    least-squares line and Pearson's r (LiLT Fig. 4) where there are 3+ layers (a line through
    two points fits any two points); writes a PNG to `path`."""
    if not isinstance(result, dict) or not result:
        raise ValueError(f"result: expected a non-empty ln_shift() result, got {result!r}")
    for tower, r in result.items():
        if not isinstance(r, dict) or not {"layers", "l1", "pearson_r"} <= set(r):
            raise ValueError(f"result[{tower!r}]: not an ln_shift() tower entry")
    path = _output_path(path)
    fig = _new_figure((5 * len(result), 4))
    axes = fig.subplots(1, len(result), squeeze=False)[0]
    colors = {"image": IMAGE_COLOR, "text": TEXT_COLOR}
    for ax, (tower, r) in zip(axes, result.items()):
        x, y = np.asarray(r["layers"], np.float64), np.asarray(r["l1"], np.float64)
        color = colors.get(tower, "tab:green")
        rho = "undefined" if r["pearson_r"] is None else f"{r['pearson_r']:+.3f}"
        ax.set_title(f"{tower} encoder, Pearson r = {rho}")
        ax.set_xlabel("layer")
        ax.set_ylabel("L1 shift of LayerNorm γ, β")
        if not len(x):
            ax.text(0.5, 0.5, "no per-layer LayerNorms", ha="center", transform=ax.transAxes)
            continue
        ax.plot(x, y, "o", color=color, label="layer")
        if len(x) >= 3:
            slope, intercept = np.polyfit(x, y, 1)
            ax.plot(x, slope * x + intercept, "-", color=color, alpha=0.6,
                    label=f"least squares (r = {rho})")
        ax.set_xticks(x)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
