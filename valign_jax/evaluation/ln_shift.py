"""How far alignment training moves each LayerNorm, layer by layer (LiLT, Khan & Fu 2023, §3.4
and Fig. 4).

For the i-th layer of a tower's transformer encoder stack, with LN_i^1(γ, β) and LN_i^2(γ, β)
its two normalisation sublayers (every LayerNorm inside the layer, in fact: BERT's
attention/output/LayerNorm and output/LayerNorm, ViT's layernorm_before/after, CLIP's
layer_norm1/2, DINOv2's norm1/2),

    l1_i = Σ_LN∈layer i ( ||γ_trained − γ_initial||_1 + ||β_trained − β_initial||_1 )

and Pearson's r of l1_i against the depth i. LiLT finds opposite signs for the two towers: the
image encoder's deepest LayerNorms move most, the text encoder's shallowest.

Only LayerNorms inside `<tower>/encoder/layer(s)/<i>/` make the per-layer series. The others
(embedding LNs, CLIP's pre/final norms, the ViT's final norm, deep-adapter layers that sit on
top of the pretrained stack, scanned stacks with no per-layer index) are reported under
"other", keyed by the LayerNorm's path. Pure NumPy in float64.
"""

from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

from valign_jax.peft import TOWER_PREFIX, norm_names

_TOWER_OF = {prefix: tower for tower, prefix in TOWER_PREFIX.items()}  # vision_model -> image
# The encoder stack's layer index: `encoder/layer/3/...` (BERT, ViT) or `encoder/layers/3/...`
_LAYER = re.compile(r"^[^/]+/encoder/layers?/(\d+)/")


def _ln_leaves(params, name: str) -> dict[str, np.ndarray]:
    """{path: leaf} of every LayerNorm scale/bias under vision_model/ or text_model/."""
    if not hasattr(params, "items"):
        raise ValueError(f"{name}: expected a nested dict of parameters, got {type(params)}")
    flat = traverse_util.flatten_dict(params, sep="/")
    # the registered families' LayerNorm names, plus a bare `norm` (HF DINOv2's final norm in
    # some exports)
    ln_leaf = re.compile(r"(^|/)(" + norm_names() + r"|norm)/(scale|bias)$")
    return {path: leaf for path, leaf in flat.items()
            if path.split("/")[0] in _TOWER_OF and ln_leaf.search(path)}


def _pearson(x, y) -> float | None:
    """Pearson's r, or None where it is undefined (fewer than 3 points, a constant series)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    # a constant series can leave rounding-sized residues around its mean: treat as zero variance
    if np.abs(dx).max() <= 1e-12 * np.abs(x).max() or np.abs(dy).max() <= 1e-12 * np.abs(y).max():
        return None
    return float(np.clip((dx @ dy) / np.sqrt((dx @ dx) * (dy @ dy)), -1.0, 1.0))


def ln_shift(initial, trained) -> dict:
    """Per-layer L1 shift of the LayerNorm parameters between two parameter trees.

    Returns {tower: {"layers": [i, ...], "l1": [...], "scale_l1": [...], "bias_l1": [...],
    "pearson_r": float | None, "other": {ln_path: l1}}} for each tower ("image", "text") that has
    LayerNorms; the lists run over the sorted layer indices. Raises ValueError naming the path
    for a LayerNorm leaf missing from one tree, mismatched shapes or non-finite values, and when
    neither tree has any LayerNorm parameter.
    """
    a, b = _ln_leaves(initial, "initial"), _ln_leaves(trained, "trained")
    if not a and not b:
        seen = sorted(set(initial) | set(trained))
        raise ValueError(f"no LayerNorm parameter under {sorted(_TOWER_OF)} in either tree; "
                         f"top-level keys seen: {seen}")
    for path in sorted(set(a) ^ set(b)):
        where, missing = ("initial", "trained") if path in a else ("trained", "initial")
        raise ValueError(f"LayerNorm parameter '{path}' is in {where} but not in {missing}")

    # per tower: layer -> [scale_l1, bias_l1]; LN module path -> l1
    per_layer: dict[str, dict[int, list[float]]] = {}
    other: dict[str, dict[str, float]] = {}
    for path in sorted(a):
        x, y = np.asarray(a[path], np.float64), np.asarray(b[path], np.float64)
        if x.shape != y.shape:
            raise ValueError(f"LayerNorm parameter '{path}': shape {x.shape} in initial, "
                             f"{y.shape} in trained")
        d = float(np.abs(y - x).sum())
        if not np.isfinite(d):
            raise ValueError(f"LayerNorm parameter '{path}' has non-finite values")
        tower = _TOWER_OF[path.split("/")[0]]
        layer = _LAYER.match(path)
        if layer:
            sums = per_layer.setdefault(tower, {}).setdefault(int(layer.group(1)), [0.0, 0.0])
            sums[path.endswith("/bias")] += d
        else:
            module = path.rsplit("/", 1)[0]
            bucket = other.setdefault(tower, {})
            bucket[module] = bucket.get(module, 0.0) + d

    result = {}
    for tower in ("image", "text"):
        if tower not in per_layer and tower not in other:
            continue
        layers = sorted(per_layer.get(tower, {}))
        scale = [per_layer[tower][i][0] for i in layers]
        bias = [per_layer[tower][i][1] for i in layers]
        l1 = [s + t for s, t in zip(scale, bias)]
        result[tower] = {"layers": layers, "l1": l1, "scale_l1": scale, "bias_l1": bias,
                         "pearson_r": _pearson(layers, l1), "other": other.get(tower, {})}
    return result


def scalars(result: dict) -> dict[str, float]:
    """Flat metrics of an `ln_shift` result: ln_shift/<tower>/{pearson_r, mean_l1, layer_<i>_l1}
    (pearson_r only where defined, the others only for towers with a per-layer series)."""
    out = {}
    for tower, r in result.items():
        if r["pearson_r"] is not None:
            out[f"ln_shift/{tower}/pearson_r"] = float(r["pearson_r"])
        if r["layers"]:
            out[f"ln_shift/{tower}/mean_l1"] = float(np.mean(r["l1"]))
        for i, v in zip(r["layers"], r["l1"]):
            out[f"ln_shift/{tower}/layer_{i}_l1"] = float(v)
    return out
