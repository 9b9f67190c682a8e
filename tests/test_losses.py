"""valign_jax.losses against independent float64 NumPy references (docs/methods.md §1–3)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from valign_jax import losses

RTOL = 1e-6
F32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture
def x64():
    # float64 for finite-difference gradient checks; a context manager so the global flag is
    # restored for the other tests.
    with jax.enable_x64(True):
        yield


def _features(seed, batch, dim, normalise=True, n=2):
    rng = np.random.default_rng(seed)
    out = [rng.normal(size=(batch, dim)).astype(np.float32) for _ in range(n)]
    if normalise:
        out = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in out]
    return out


def _f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


# ------------------------------- NumPy float64 references ------------------------------------


def ref_softmax_contrastive(img, txt, scale):
    img, txt = _f64(img, txt)
    logits = scale * img @ txt.T
    b = len(img)
    row = sum(-logits[i, i] + np.log(np.sum(np.exp(logits[i] - logits[i].max()))) + logits[i].max()
              for i in range(b)) / b
    col = sum(-logits[j, j] + np.log(np.sum(np.exp(logits[:, j] - logits[:, j].max())))
              + logits[:, j].max() for j in range(b)) / b
    return 0.5 * (row + col)


def ref_sigmoid_single(img, txt, scale, bias, norm):
    img, txt = _f64(img, txt)
    b = len(img)
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            logit = scale * img[i] @ txt[j] + bias
            total += np.logaddexp(0.0, -z * logit)  # -log sigmoid(z * logit)
    return total / (b if norm == "batch" else b * b)


def ref_sigmoid(img, txt, scale, bias, norm, txt_extra=None):
    loss = ref_sigmoid_single(img, txt, scale, bias, norm)
    if txt_extra is None:
        return loss
    return 0.5 * (loss + ref_sigmoid_single(img, txt_extra, scale, bias, norm))


def ref_rafa(z_img, z_txt, ref, form):
    z_img, z_txt, ref = _f64(z_img, z_txt, ref)
    b, d = z_img.shape
    if form == "official":
        return np.mean((z_img - ref) ** 2) + np.mean((z_txt - ref) ** 2)
    return sum(np.sum((z_img[i] - ref[i]) ** 2) + np.sum((z_txt[i] - ref[i]) ** 2)
               for i in range(b)) / (2 * b)


def _np_softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_hycd(s_img, s_txt, t_img, t_txt, alpha, temperature):
    s_img, s_txt, t_img, t_txt = _f64(s_img, s_txt, t_img, t_txt)
    b = len(s_img)

    def one_direction(ls, lt):
        q = alpha * np.eye(b) + (1 - alpha) * _np_softmax(lt / temperature)
        p = _np_softmax(ls / temperature)
        kl = 0.0
        for i in range(b):
            for j in range(b):
                if q[i, j] > 0:
                    kl += q[i, j] * (np.log(q[i, j]) - np.log(p[i, j]))
        return kl / b

    ls, lt = s_img @ s_txt.T, t_img @ t_txt.T
    return 0.5 * (one_direction(ls, lt) + one_direction(ls.T, lt.T)) * temperature**2


# ------------------------------------- value tests -------------------------------------------


def assert_matches(fn, want, arrays, logit_magnitude=1.0):
    """fn(*arrays) equals the float64 reference `want`, in float64 and in float32.

    float64 checks the math itself to <= 1e-6 relative (in practice ~1e-15). float32 is held to
    1e-6 relative too, plus an absolute floor of a few ulps of the largest logit: a loss that is the
    difference of two logits of size ~100 (e.g. -L_ii + logsumexp) cannot be more exact than that.
    """
    with jax.enable_x64(True):
        got = fn(*(jnp.asarray(a, jnp.float64) for a in arrays))
        assert got.shape == () and got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-12)
    got = fn(*(jnp.asarray(a, jnp.float32) for a in arrays))
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=8 * F32_EPS * logit_magnitude)



@pytest.mark.parametrize("batch", [2, 5, 16])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_softmax_contrastive_matches_reference(batch, scale):
    img, txt = _features(batch, batch, 8)
    assert_matches(lambda i, t: losses.softmax_contrastive(i, t, scale),
                   ref_softmax_contrastive(img, txt, scale), (img, txt), logit_magnitude=scale)


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (20.0, -10.0), (1.0, 0.0), (100.0, 3.0)])
@pytest.mark.parametrize("norm", ["batch", "pairs"])
def test_sigmoid_matches_reference(batch, scale, bias, norm):
    img, txt, extra = _features(batch, batch, 8, n=3)
    magnitude = scale + abs(bias)
    assert_matches(lambda i, t: losses.sigmoid(i, t, scale, bias, norm=norm),
                   ref_sigmoid(img, txt, scale, bias, norm), (img, txt), magnitude)
    assert_matches(lambda i, t, e: losses.sigmoid(i, t, scale, bias, norm=norm, txt_extra=e),
                   ref_sigmoid(img, txt, scale, bias, norm, extra), (img, txt, extra), magnitude)


def test_sigmoid_multi_positive_is_mean_of_the_two():
    img, txt, extra = _features(0, 8, 8, n=3)
    for norm in ["batch", "pairs"]:
        both = losses.sigmoid(img, txt, 10.0, -10.0, norm=norm, txt_extra=extra)
        one = losses.sigmoid(img, txt, 10.0, -10.0, norm=norm)
        two = losses.sigmoid(img, extra, 10.0, -10.0, norm=norm)
        np.testing.assert_allclose(both, 0.5 * (one + two), rtol=RTOL)


def test_chunked_sigmoid_on_one_device_is_sigmoid():
    # The multi-device ring is tested in test_losses_multidevice.py; here n = 1 (no permutations).
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    img, txt, extra = (jnp.asarray(x) for x in _features(2, 6, 4, n=3))
    for norm, e in [("batch", None), ("pairs", extra)]:
        got = jax.value_and_grad(losses.chunked_sigmoid, (0, 1, 2, 3))(
            img, txt, 10.0, -10.0, mesh=mesh, norm=norm, txt_extra=e)
        want = jax.value_and_grad(losses.sigmoid, (0, 1, 2, 3))(img, txt, 10.0, -10.0, norm, e)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), got, want)


def test_chunked_softmax_on_one_device_is_softmax_contrastive():
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    img, txt = (jnp.asarray(x) for x in _features(3, 6, 4))
    got = jax.value_and_grad(losses.chunked_softmax_contrastive, (0, 1, 2))(img, txt, 20.0,
                                                                           mesh=mesh)
    want = jax.value_and_grad(losses.softmax_contrastive, (0, 1, 2))(img, txt, 20.0)
    # float32, different summation order (the backward pass adds row and column softmaxes).
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), got, want)


def test_ring_losses_backward_matches_finite_differences(x64):
    """The ring losses' hand-written backward passes against float64 finite differences of
    their own forward passes (reverse mode: custom VJPs have no forward mode)."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    img, txt, extra = _f64(*_features(4, 5, 3, n=3))
    check_grads(lambda i, t, s: losses.chunked_softmax_contrastive(i, t, s, mesh=mesh),
                (img, txt, 7.0), order=1, modes=("rev",))
    check_grads(lambda i, t, s, b, e: losses.chunked_sigmoid(i, t, s, b, mesh=mesh, norm="pairs",
                                                             txt_extra=e),
                (img, txt, 7.0, -3.0, extra), order=1, modes=("rev",))


def test_sigmoid_norms_differ_by_batch_size():
    img, txt = _features(1, 12, 8)
    np.testing.assert_allclose(losses.sigmoid(img, txt, 10.0, -10.0, norm="batch"),
                               12 * losses.sigmoid(img, txt, 10.0, -10.0, norm="pairs"), rtol=RTOL)


@pytest.mark.parametrize("batch,dim", [(1, 4), (7, 16), (32, 3)])
@pytest.mark.parametrize("form", ["official", "paper"])
def test_rafa_matches_reference(batch, dim, form):
    z_img, z_txt, ref = _features(batch, batch, dim, normalise=False, n=3)
    assert_matches(lambda *a: losses.rafa(*a, form=form), ref_rafa(z_img, z_txt, ref, form),
                   (z_img, z_txt, ref))


def test_rafa_paper_form_is_official_times_half_dim():
    z_img, z_txt, ref = _features(3, 10, 24, normalise=False, n=3)
    np.testing.assert_allclose(losses.rafa(z_img, z_txt, ref, form="paper"),
                               losses.rafa(z_img, z_txt, ref) * 24 / 2, rtol=RTOL)


def test_rafa_gradient_step_moves_features_toward_reference():
    z_img, z_txt, ref = (jnp.asarray(x) for x in _features(4, 16, 8, normalise=False, n=3))
    g_img, g_txt = jax.grad(losses.rafa, argnums=(0, 1))(z_img, z_txt, ref)
    new_img, new_txt = z_img - 0.1 * g_img, z_txt - 0.1 * g_txt
    for old, new in [(z_img, new_img), (z_txt, new_txt)]:
        before = jnp.linalg.norm(old - ref, axis=1)
        after = jnp.linalg.norm(new - ref, axis=1)
        assert bool(jnp.all(after < before))


@pytest.mark.parametrize("batch", [1, 4, 12])
@pytest.mark.parametrize("alpha,temperature",
                         [(0.5, 1.0), (0.0, 1.0), (1.0, 1.0), (0.3, 0.5), (0.8, 2.0)])
def test_hycd_matches_reference(batch, alpha, temperature):
    # Un-normalised features of moderate size: HyCD uses raw dot products.
    feats = _features(batch, batch, 8, normalise=False, n=4)
    logits = max(np.abs(feats[0] @ feats[1].T).max(), np.abs(feats[2] @ feats[3].T).max())
    assert_matches(lambda *a: losses.hycd(*a, alpha=alpha, temperature=temperature),
                   ref_hycd(*feats, alpha, temperature), feats, logits / temperature)


def test_hycd_alpha_one_is_student_cross_entropy():
    s_img, s_txt, t_img, t_txt = _features(5, 10, 8, normalise=False, n=4)
    T = 2.0
    ls = np.float64(s_img) @ np.float64(s_txt).T / T
    row_ce = -np.mean(np.diag(ls - np.log(np.exp(ls).sum(1, keepdims=True))))
    col_ce = -np.mean(np.diag(ls - np.log(np.exp(ls).sum(0, keepdims=True))))
    want = 0.5 * (row_ce + col_ce) * T**2
    got = losses.hycd(s_img, s_txt, t_img, t_txt, alpha=1.0, temperature=T)
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_hycd_alpha_zero_is_pure_distillation():
    s_img, s_txt, t_img, t_txt = _features(6, 10, 8, normalise=False, n=4)
    ls = np.float64(s_img) @ np.float64(s_txt).T
    lt = np.float64(t_img) @ np.float64(t_txt).T

    def kl(q, p):
        return np.mean(np.sum(q * (np.log(q) - np.log(p)), axis=1))

    want = 0.5 * (kl(_np_softmax(lt), _np_softmax(ls)) + kl(_np_softmax(lt.T), _np_softmax(ls.T)))
    got = losses.hycd(s_img, s_txt, t_img, t_txt, alpha=0.0)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    # Student == teacher: zero divergence.
    np.testing.assert_allclose(losses.hycd(t_img, t_txt, t_img, t_txt, alpha=0.0), 0.0, atol=1e-6)


def test_hycd_teacher_gets_no_gradient():
    feats = [jnp.asarray(x) for x in _features(7, 8, 8, normalise=False, n=4)]
    grads = jax.grad(losses.hycd, argnums=(0, 1, 2, 3))(*feats)
    assert float(jnp.abs(grads[0]).sum()) > 0 and float(jnp.abs(grads[1]).sum()) > 0
    assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3]))


def test_contrastive_metrics_match_reference():
    img, txt = _features(8, 9, 4)
    scale, bias = 12.0, -3.0
    logits = scale * np.float64(img) @ np.float64(txt).T + bias
    m = losses.contrastive_metrics(img, txt, scale, bias)
    np.testing.assert_allclose(m["i2t_accuracy"], np.mean(logits.argmax(1) == np.arange(9)))
    np.testing.assert_allclose(m["t2i_accuracy"], np.mean(logits.argmax(0) == np.arange(9)))
    np.testing.assert_allclose(m["mean_positive_logit"], np.mean(np.diag(logits)), rtol=RTOL)
    off = logits[~np.eye(9, dtype=bool)]
    np.testing.assert_allclose(m["mean_negative_logit"], off.mean(), rtol=1e-5)
    # Perfectly aligned features retrieve themselves.
    m = losses.contrastive_metrics(img, img, 10.0)
    assert float(m["i2t_accuracy"]) == 1.0 and float(m["t2i_accuracy"]) == 1.0


# --------------------------------- dtype, stability, errors ---------------------------------


def test_bf16_inputs_are_computed_in_float32():
    img, txt, extra = (jnp.asarray(x, jnp.bfloat16) for x in _features(9, 8, 8, n=3))
    img32, txt32 = np.float32(img), np.float32(txt)  # the values bf16 actually holds
    out = losses.softmax_contrastive(img, txt, jnp.bfloat16(14.0))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_softmax_contrastive(img32, txt32, 14.0), rtol=RTOL)
    out = losses.sigmoid(img, txt, jnp.bfloat16(10.0), jnp.bfloat16(-10.0))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_sigmoid(img32, txt32, 10.0, -10.0, "batch"), rtol=RTOL)
    for out in [losses.rafa(img, txt, extra), losses.hycd(img, txt, extra, img)]:
        assert out.dtype == jnp.float32 and out.shape == ()


def test_extreme_logits_stay_finite():
    img, txt = (jnp.asarray(x) for x in _features(10, 8, 8))
    for fn in [lambda i, t: losses.softmax_contrastive(i, t, 1e4),
               lambda i, t: losses.sigmoid(i, t, 1e4, -1e4),
               lambda i, t: losses.hycd(1e3 * i, 1e3 * t, 1e3 * t, 1e3 * i)]:
        value, grads = jax.value_and_grad(fn, argnums=(0, 1))(img, txt)
        assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


def test_bad_options_raise():
    img, txt = _features(11, 4, 4)
    with pytest.raises(ValueError):
        losses.sigmoid(img, txt, 1.0, 0.0, norm="mean")
    with pytest.raises(ValueError):
        losses.rafa(img, txt, txt, form="both")


# ------------------------------------ gradients (float64) ------------------------------------


def _grad_cases():
    def sig(norm, extra):
        return lambda i, t, s, b, e: losses.sigmoid(i, t, s, b, norm, e if extra else None)

    def hy(alpha, T):
        # Teacher held fixed: stop_gradient makes finite differences and autodiff disagree on it.
        teacher_img, teacher_txt = _f64(*_features(13, 5, 4))
        return lambda i, t, s, b, e: losses.hycd(i, t, teacher_img, teacher_txt, alpha, T)

    yield "softmax", lambda i, t, s, b, e: losses.softmax_contrastive(i, t, s)
    for norm in ["batch", "pairs"]:
        yield f"sigmoid-{norm}", sig(norm, False)
        yield f"sigmoid-{norm}-multipositive", sig(norm, True)
    for form in ["official", "paper"]:
        yield f"rafa-{form}", lambda i, t, s, b, e, form=form: losses.rafa(i, t, e, form=form)
    for alpha, T in [(0.5, 1.0), (0.0, 2.0), (1.0, 0.5)]:
        yield f"hycd-{alpha}-{T}", hy(alpha, T)


@pytest.mark.parametrize("name,fn", list(_grad_cases()), ids=[n for n, _ in _grad_cases()])
def test_gradients_float64(x64, name, fn):
    img, txt, extra = (jnp.asarray(x, jnp.float64) for x in _features(12, 5, 4, n=3))
    args = (img, txt, jnp.float64(7.0), jnp.float64(-2.0), extra)
    assert fn(*args).dtype == jnp.float64  # no silent downcast
    # jit: check_grads re-traces for every order/mode, and eager float64 ops compile one by one.
    check_grads(jax.jit(fn), args, order=1, modes=("fwd", "rev"), eps=1e-6, atol=1e-6, rtol=1e-6)


# -------------------------------- logit-scale conventions -----------------------------------


def test_logit_scale_presets():
    p = losses.LOGIT_SCALE_PRESETS
    assert set(p) == {"clip", "siglip", "sail", "lilt"}
    assert math.isclose(p["clip"].init_log_scale, math.log(1 / 0.07))
    assert p["clip"].init_bias is None and p["lilt"].init_bias is None
    assert math.isclose(math.exp(p["clip"].max_log_scale), 100.0)
    assert math.isclose(math.exp(p["siglip"].init_log_scale), 10.0)
    assert p["siglip"].init_bias == -10.0
    assert math.isclose(math.exp(p["sail"].init_log_scale), 20.0) and p["sail"].init_bias == -10.0
    assert (p["sail"].min_log_scale, p["sail"].max_log_scale) == (0.0, math.log(100.0))
    # LiLT: temperature in [0.001, 0.5] <=> scale in [2, 1000].
    assert math.isclose(1 / math.exp(p["lilt"].max_log_scale), 0.001)
    assert math.isclose(1 / math.exp(p["lilt"].min_log_scale), 0.5)
    assert math.isclose(1 / math.exp(p["lilt"].init_log_scale), 0.07)


@pytest.mark.parametrize("recipe", ["clip", "siglip", "sail", "lilt"])
def test_clamp_log_scale_holds_bounds(recipe):
    preset = losses.LOGIT_SCALE_PRESETS[recipe]
    values = jnp.array([-50.0, -1.0, 0.5, preset.init_log_scale, 5.0, 50.0])
    clamped = np.asarray(losses.clamp_log_scale(values, recipe))
    lo = -np.inf if preset.min_log_scale is None else preset.min_log_scale
    hi = np.inf if preset.max_log_scale is None else preset.max_log_scale
    np.testing.assert_allclose(clamped, np.clip(np.asarray(values), lo, hi), rtol=1e-6)
    assert np.all(clamped >= lo - 1e-6) and np.all(clamped <= hi + 1e-6)
    # The init value is inside its own bounds, and a preset object works as well as its name.
    assert math.isclose(float(losses.clamp_log_scale(preset.init_log_scale, preset)),
                        preset.init_log_scale, rel_tol=1e-6)


def test_sample_rafa_reference():
    key = jax.random.key(0)
    r = losses.sample_rafa_reference(key, 4096, 64, std=3.0)
    assert r.shape == (4096, 64) and r.dtype == jnp.float32
    assert abs(float(r.mean())) < 0.02 and abs(float(r.std()) - 3.0) < 0.02
    np.testing.assert_array_equal(r, losses.sample_rafa_reference(key, 4096, 64, std=3.0))
    other = losses.sample_rafa_reference(jax.random.key(1), 4096, 64, std=3.0)
    assert not np.allclose(r, other)
    # Per-dimension and per-sample stats look like independent N(0, std²) draws.
    assert np.all(np.abs(np.asarray(r.std(axis=0)) - 3.0) < 0.3)
    assert np.all(np.asarray(losses.sample_rafa_reference(key, 8, 2, std=0.0)) == 0)
