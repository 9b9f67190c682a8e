"""LayerNorm shift (LiLT Fig. 4) against a brute-force reference on the demo models' real
parameter trees, and the embedding (modality gap) / LN-shift figures."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from valign_jax.evaluation import plots
from valign_jax.evaluation.geometry import geometry_metrics
from valign_jax.evaluation.ln_shift import ln_shift, scalars
from valign_jax.models.layout import stack_layers
from valign_jax.recipes import load_config
from valign_jax.run_setup import build_model

TOWERS = {"image": "vision_model", "text": "text_model"}


@pytest.fixture(scope="module")
def trees():
    """Initial parameters (NumPy leaves) of the CLIP demo (CLIP towers) and the LiLT demo
    (ViT + BERT towers)."""
    out = {}
    for name in ("clip", "lilt"):
        model = build_model(load_config(f"configs/{name}.py:demo"))
        params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs())["params"]
        out[name] = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    return out


def _stack(params, prefix):
    enc = params[prefix]["encoder"]
    return enc["layers" if "layers" in enc else "layer"]


def deepen(params, n):
    """The same tree with n encoder layers per tower (copies of the real ones), so the depth
    series is long enough for a Pearson r."""
    params = copy.deepcopy(params)
    for prefix in TOWERS.values():
        stack = _stack(params, prefix)
        real = len(stack)
        for i in range(real, n):
            stack[str(i)] = copy.deepcopy(stack[str(i % real)])
    return params


def is_ln_leaf(path):
    """The test's own LayerNorm selection: a scale/bias whose module name mentions 'norm'."""
    parts = path.split("/")
    return parts[-1] in ("scale", "bias") and "norm" in parts[-2].lower()


def layer_of(path):
    parts = path.split("/")
    if len(parts) > 3 and parts[1] == "encoder" and parts[2] in ("layer", "layers"):
        return int(parts[3]) if parts[3].isdigit() else None
    return None


def perturb(params, scale_shift, bias_shift, other_shift=0.0):
    """Adds scale_shift[i] to every element of layer i's LN scales, bias_shift[i] to its LN
    biases, other_shift to LNs outside the stack and 1.0 to every non-LN parameter (which must
    not count)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for path, leaf in flat.items():
        if path.split("/")[0] not in TOWERS.values() or not is_ln_leaf(path):
            out[path] = leaf + 1.0
        elif layer_of(path) is None:
            out[path] = leaf + other_shift
        else:
            i = layer_of(path)
            out[path] = leaf + (scale_shift[i] if path.endswith("scale") else bias_shift[i])
    return traverse_util.unflatten_dict(out, sep="/")


def reference(initial, trained):
    """Brute force: per tower and layer, Σ|Δ| over the selected flat leaves."""
    a = traverse_util.flatten_dict(initial, sep="/")
    b = traverse_util.flatten_dict(trained, sep="/")
    out = {}
    for tower, prefix in TOWERS.items():
        n = len(_stack(initial, prefix))
        ref = {"scale_l1": np.zeros(n), "bias_l1": np.zeros(n)}
        for path in a:
            if path.startswith(prefix + "/") and is_ln_leaf(path) and layer_of(path) is not None:
                key = "scale_l1" if path.endswith("scale") else "bias_l1"
                ref[key][layer_of(path)] += np.abs(np.float64(b[path]) - np.float64(a[path])).sum()
        ref["l1"] = ref["scale_l1"] + ref["bias_l1"]
        out[tower] = ref
    return out


@pytest.mark.parametrize("name", ["clip", "lilt"])
def test_matches_brute_force_and_corrcoef(trees, name):
    initial = deepen(trees[name], 6)
    rng = np.random.default_rng(1)
    c, d = rng.uniform(0.01, 0.1, 6), rng.uniform(0.01, 0.1, 6)
    trained = perturb(initial, c, d, other_shift=0.5)
    result = ln_shift(initial, trained)
    ref = reference(initial, trained)
    assert set(result) == {"image", "text"}
    for tower in ("image", "text"):
        r = result[tower]
        assert r["layers"] == list(range(6))
        for key in ("l1", "scale_l1", "bias_l1"):
            np.testing.assert_allclose(r[key], ref[tower][key], rtol=1e-6)
        # and by construction: two LNs of width 64 per layer
        np.testing.assert_allclose(r["l1"], 2 * 64 * (c + d), rtol=1e-4)
        expected_r = np.corrcoef(np.arange(6), ref[tower]["l1"])[0, 1]
        assert r["pearson_r"] == pytest.approx(expected_r, abs=1e-9)
        # LNs outside the stack are "other", each a module with scale + bias of width 64
        assert r["other"] and all(v == pytest.approx(2 * 64 * 0.5, rel=1e-4)
                                  for v in r["other"].values())
    others = set(result["image"]["other"]) | set(result["text"]["other"])
    if name == "clip":
        assert others == {"vision_model/pre_layrnorm", "vision_model/post_layernorm",
                          "text_model/final_layer_norm"}
    else:
        assert others == {"vision_model/layernorm", "text_model/embeddings/LayerNorm"}

    flat = scalars(result)
    assert flat["ln_shift/image/pearson_r"] == result["image"]["pearson_r"]
    assert flat["ln_shift/text/mean_l1"] == pytest.approx(np.mean(ref["text"]["l1"]))
    assert flat["ln_shift/image/layer_5_l1"] == pytest.approx(ref["image"]["l1"][5])
    assert all(isinstance(v, float) for v in flat.values())


def test_jax_leaves_and_two_layers(trees):
    """The demo's own 2 layers (too few for r) with jax-array leaves in the trained tree."""
    initial = trees["clip"]
    trained = jax.tree_util.tree_map(jnp.asarray, perturb(initial, [0.1, 0.3], [0.0, 0.0]))
    result = ln_shift(initial, trained)
    np.testing.assert_allclose(result["text"]["l1"], [2 * 64 * 0.1, 2 * 64 * 0.3], rtol=1e-4)
    np.testing.assert_allclose(result["text"]["bias_l1"], [0.0, 0.0])
    assert result["text"]["pearson_r"] is None
    assert "ln_shift/text/pearson_r" not in scalars(result)


def test_unchanged_gives_zeros_and_no_r(trees):
    initial = deepen(trees["lilt"], 4)
    result = ln_shift(initial, copy.deepcopy(initial))
    for r in result.values():
        assert r["l1"] == [0.0] * 4 and r["pearson_r"] is None
        assert all(v == 0.0 for v in r["other"].values())
    assert not any(k.endswith("pearson_r") for k in scalars(result))


def test_scanned_stack_counts_as_other(trees):
    params = trees["clip"]
    paths = (("vision_model", "encoder", "layers"), ("text_model", "encoder", "layers"))
    initial = stack_layers(params, paths)
    trained = stack_layers(perturb(params, [0.1, 0.2], [0.0, 0.0]), paths)
    result = ln_shift(initial, trained)
    assert result["image"]["layers"] == [] and result["image"]["pearson_r"] is None
    assert result["image"]["other"]["vision_model/encoder/layers/layer_norm1"] == \
        pytest.approx(64 * 0.3, rel=1e-4)


def test_errors(trees):
    initial = trees["lilt"]
    missing = traverse_util.flatten_dict(copy.deepcopy(initial), sep="/")
    path = "vision_model/encoder/layer/1/layernorm_after/bias"
    del missing[path]
    with pytest.raises(ValueError, match=path):
        ln_shift(initial, traverse_util.unflatten_dict(missing, sep="/"))
    with pytest.raises(ValueError, match=path):
        ln_shift(traverse_util.unflatten_dict(missing, sep="/"), initial)

    reshaped = traverse_util.flatten_dict(copy.deepcopy(initial), sep="/")
    reshaped[path] = np.zeros(65, np.float32)
    with pytest.raises(ValueError, match=path):
        ln_shift(initial, traverse_util.unflatten_dict(reshaped, sep="/"))

    no_ln = {"visual_projection": {"kernel": np.ones((2, 2))}, "logit_scale": np.zeros(())}
    with pytest.raises(ValueError, match="visual_projection"):
        ln_shift(no_ln, no_ln)


def test_pca_2d_matches_eigh():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(300, 16)) + 2.0 * np.eye(16)[0]   # a modality gap along axis 0
    txt = rng.normal(size=(200, 16)) * np.linspace(0.5, 2, 16)
    img_2d, txt_2d, ratio = plots.pca_2d(img, txt)
    assert img_2d.shape == (300, 2) and txt_2d.shape == (200, 2)

    union = np.concatenate([img / np.linalg.norm(img, axis=1, keepdims=True),
                            txt / np.linalg.norm(txt, axis=1, keepdims=True)])
    centred = union - union.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov(centred, rowvar=False))
    top = evecs[:, ::-1][:, :2]
    ref = centred @ top
    ours = np.concatenate([img_2d, txt_2d])
    for k in range(2):
        sign = np.sign(ours[:, k] @ ref[:, k])
        np.testing.assert_allclose(ours[:, k], sign * ref[:, k], atol=1e-9)
    np.testing.assert_allclose(ratio, evals[::-1][:2] / evals.sum(), rtol=1e-9)
    # deterministic sign: the same input gives the same picture
    np.testing.assert_array_equal(plots.pca_2d(img, txt)[0], img_2d)


def test_pca_2d_errors():
    with pytest.raises(ValueError, match="text_features"):
        plots.pca_2d(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="image_features"):
        plots.pca_2d(np.full((3, 4), np.nan), np.ones((3, 4)))


def _gap_across_the_spread(theta, dim=6, n=40, seed=0):
    """Unit features with a known gap: image rows cos θ u + sin θ v, text rows −cos θ u + sin θ w,
    v and w balanced over ±a, ±b (a, b, u orthonormal, u not along any axis), so the centroids
    are ±cos θ u and the gap is 2 cos θ, orthogonal to the much larger spread within each
    modality."""
    q = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))[0]
    u, a, b = q[:, 0], q[:, 1], q[:, 2]
    spread = np.array([a, -a, b, -b] * (n // 4))
    img = np.cos(theta) * u + np.sin(theta) * spread
    txt = -np.cos(theta) * u + np.sin(theta) * spread[::-1]
    return img, txt, 2 * np.cos(theta)


def test_gap_projection_shows_a_known_gap():
    theta = np.deg2rad(80.0)
    img, txt, gap = _gap_across_the_spread(theta)
    img_2d, txt_2d, ratio, found = plots.gap_projection(img, txt)
    centroids = img_2d.mean(axis=0) - txt_2d.mean(axis=0)
    assert centroids[0] == pytest.approx(gap, abs=1e-12) and found == pytest.approx(gap, abs=1e-12)
    assert centroids[1] == pytest.approx(0.0, abs=1e-12)
    assert gap == pytest.approx(geometry_metrics(img, txt)["gap"], abs=1e-12)
    # the first axis carries the gap's share of the variance: (gap / 2)² of 1 − 0 per point
    assert ratio[0] == pytest.approx((gap / 2) ** 2, abs=1e-12)
    # what the top two principal components drew: both centroids at the same point
    pc_img, pc_txt, _ = plots.pca_2d(img, txt)
    assert np.linalg.norm(pc_img.mean(axis=0) - pc_txt.mean(axis=0)) < 1e-9


def test_gap_projection_on_random_features():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(50, 8)) + np.linspace(-1, 1, 8)
    txt = rng.normal(size=(30, 8)) * np.linspace(0.2, 3, 8)
    img_2d, txt_2d, ratio, gap = plots.gap_projection(img, txt)
    x = img / np.linalg.norm(img, axis=1, keepdims=True)
    y = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    assert gap == pytest.approx(np.linalg.norm(x.mean(axis=0) - y.mean(axis=0)), abs=1e-12)
    centroids = img_2d.mean(axis=0) - txt_2d.mean(axis=0)
    np.testing.assert_allclose(centroids, [gap, 0.0], atol=1e-12)
    # second axis: the top eigenvector of the union's covariance once the gap axis is removed
    union = np.concatenate([x, y])
    centred = union - union.mean(axis=0)
    first = (x.mean(axis=0) - y.mean(axis=0)) / gap
    rest = centred - np.outer(centred @ first, first)
    evecs = np.linalg.eigh(rest.T @ rest)[1]
    ref = centred @ evecs[:, -1]
    ours = np.concatenate([img_2d, txt_2d])[:, 1]
    np.testing.assert_allclose(ours, np.sign(ours @ ref) * ref, atol=1e-9)
    np.testing.assert_allclose(np.concatenate([img_2d, txt_2d])[:, 0], centred @ first,
                               atol=1e-12)
    np.testing.assert_allclose(ratio, (np.concatenate([img_2d, txt_2d]) ** 2).sum(axis=0)
                               / (centred ** 2).sum(), rtol=1e-12)


def test_gap_projection_without_a_gap():
    """Equal centroids: the first axis falls back to the top principal component."""
    rng = np.random.default_rng(2)
    img = rng.normal(size=(20, 5)) * [3, 1, 1, 1, 1] + [0, 0, 0, 0, 5]
    img_2d, txt_2d, ratio, gap = plots.gap_projection(img, img.copy())
    assert gap == 0.0 and np.isfinite(img_2d).all()
    pc_img = plots.pca_2d(img, img.copy())[0]
    np.testing.assert_allclose(np.abs(img_2d), np.abs(pc_img), atol=1e-9)


def _valid_png(path):
    from matplotlib.image import imread
    assert path.exists() and path.stat().st_size > 0
    pixels = imread(path)
    assert pixels.ndim >= 2 and pixels.shape[0] > 0 and pixels.shape[1] > 0


def test_pca_plot_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(2500, 8)) + 1.0, rng.normal(size=(100, 8))  # image is subsampled
    out = plots.pca_plot(img, txt, tmp_path / "nested" / "pca.png", title="demo")
    assert out == tmp_path / "nested" / "pca.png"
    _valid_png(out)
    with pytest.raises(ValueError, match="path"):
        plots.pca_plot(img, txt, "")


def test_ln_shift_plot_writes_png(tmp_path, trees):
    initial = deepen(trees["clip"], 5)
    result = ln_shift(initial, perturb(initial, np.linspace(0.1, 0.5, 5), np.zeros(5)))
    _valid_png(plots.ln_shift_plot(result, tmp_path / "fig" / "ln_shift.png"))
    # a tower without per-layer LNs and an undefined r still draws
    result["text"].update(layers=[], l1=[], pearson_r=None)
    _valid_png(plots.ln_shift_plot(result, tmp_path / "partial.png"))
    with pytest.raises(ValueError, match="result"):
        plots.ln_shift_plot({}, tmp_path / "x.png")


def test_ln_shift_plot_fits_no_line_through_two_layers(tmp_path, monkeypatch):
    drawn = []
    new_figure = plots._new_figure
    monkeypatch.setattr(plots, "_new_figure", lambda size: drawn.append(new_figure(size))
                        or drawn[-1])
    result = {"image": {"layers": [0, 1], "l1": [0.1, 0.3], "pearson_r": None},
              "text": {"layers": [0, 1, 2], "l1": [0.1, 0.3, 0.2], "pearson_r": 0.5}}
    _valid_png(plots.ln_shift_plot(result, tmp_path / "short.png"))
    image_axes, text_axes = drawn[0].axes
    assert len(image_axes.lines) == 1                 # the two points, no line
    assert len(text_axes.lines) == 2                  # the points and the least-squares line
    np.testing.assert_allclose(text_axes.lines[1].get_ydata(),
                               np.polyval(np.polyfit([0, 1, 2], [0.1, 0.3, 0.2], 1), [0, 1, 2]))
