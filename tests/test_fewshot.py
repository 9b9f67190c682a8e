"""The few-shot ridge probe: its closed form against NumPy's least squares on the augmented
system, and the whole probe (shots, λ selection, accuracy) against a brute-force loop."""

import numpy as np
import pytest

from valign_jax.evaluation import fewshot


def _lstsq_ridge(x, y, reg):
    """argmin ‖x W + 1 bᵀ − y‖² + reg ‖W‖² as one least-squares problem: rows [x, 1] -> y and
    sqrt(reg) [I, 0] -> 0 (the intercept is not penalised)."""
    n, d = x.shape
    a = np.block([[x, np.ones((n, 1))], [np.sqrt(reg) * np.eye(d), np.zeros((d, 1))]])
    rhs = np.concatenate([y, np.zeros((d, y.shape[1]))])
    sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
    return sol[:d], sol[d]


@pytest.mark.parametrize("n,d", [(30, 6), (8, 20)])   # more rows than dims and fewer
def test_ridge_closed_form_matches_lstsq(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) + 0.3
    y = 2.0 * np.eye(4)[rng.integers(4, size=n)] - 1.0
    regs = [1e-3, 0.1, 10.0]
    w, b = fewshot.ridge_fit(x, y, regs)
    assert w.shape == (3, d, 4) and b.shape == (3, 4)
    for r, reg in enumerate(regs):
        w_ref, b_ref = _lstsq_ridge(x, y, reg)
        np.testing.assert_allclose(w[r], w_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(b[r], b_ref, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="regs"):
        fewshot.ridge_fit(x, y, [0.0])


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _loop_probe(train, train_labels, test, test_labels, k, seed, centre, regs, max_folds):
    """The probe written out: shots per class, folds, λ by held-out accuracy, test accuracy."""
    classes = sorted(set(train_labels.tolist()))
    shots, ranks = [], []
    for c in classes:
        members = [i for i, label in enumerate(train_labels) if label == c]
        order = np.random.default_rng([seed, c]).permutation(len(members))
        for rank in range(k):
            shots.append(members[order[rank]])
            ranks.append(rank)
    x = np.array([_unit(train[i]) for i in shots])
    t = np.array([_unit(v) for v in test])
    if centre:
        mean = x.mean(axis=0)
        x, t = _unit(x - mean), _unit(t - mean)
    codes = np.array([classes.index(train_labels[i]) for i in shots])
    ranks = np.array(ranks)

    def fit(rows, reg):
        return _lstsq_ridge(x[rows], 2.0 * np.eye(len(classes))[codes[rows]] - 1.0, reg)

    def accuracy(w, b, feats, truth):
        hits = 0
        for f, c in zip(feats, truth):
            scores = f @ w + b
            hits += int(np.argmax(scores)) == c
        return hits / len(feats)
    if k == 1:
        reg = max(regs)
    else:
        mean_acc = []
        for reg in regs:
            accs = [accuracy(*fit(ranks != f, reg), x[ranks == f], codes[ranks == f])
                    for f in range(min(k, max_folds))]
            mean_acc.append(np.mean(accs))
        best = max(mean_acc)
        reg = max(r for r, a in zip(regs, mean_acc) if a == best)
    truth = [classes.index(c) for c in test_labels]
    return accuracy(*fit(np.ones(len(shots), bool), reg), t, truth), reg


@pytest.mark.parametrize("centre", [False, True])
def test_probe_matches_loop(centre):
    # class signal in low-noise dimensions, strong shared noise elsewhere: least squares needs
    # a small λ to see past the noise, so the selection is exercised, not only its tie-break
    rng = np.random.default_rng(3)
    ids = [2, 4, 7, 9, 11]   # sparse class ids
    means = 0.5 * rng.normal(size=(5, 12))
    means[:, :6] = 0.0
    means[:, 0] += 3.0
    labels = np.array(ids)[rng.integers(5, size=200)]
    noise = rng.normal(size=(200, 12)) * np.r_[np.full(6, 1.0), np.full(6, 0.15)]
    feats = means[np.searchsorted(ids, labels)] + noise
    train, test = feats[:140], feats[140:]
    train_labels, test_labels = labels[:140], labels[140:]
    regs = (1e-3, 1e-1, 10.0)
    chosen = []
    for k in (1, 2, 7):
        got = fewshot.fewshot_probe(train, train_labels, test, test_labels, k, seed=5,
                                    centre=centre, regs=regs, max_folds=3)
        want = _loop_probe(train, train_labels, test, test_labels, k, 5, centre, regs, 3)
        assert got[1] == want[1]
        assert got[0] == pytest.approx(want[0], abs=1e-12)
        chosen.append(got[1])
    assert min(chosen) < max(regs)
    metrics = fewshot.fewshot_metrics(train, train_labels, test, test_labels, shots=(1, 7),
                                      seed=5, centre=centre, regs=regs, max_folds=3)
    assert list(metrics) == ["1shot", "7shot"]
    assert metrics["7shot"] == fewshot.fewshot_probe(train, train_labels, test, test_labels, 7,
                                                     5, centre, regs, 3)[0]
    assert metrics["7shot"] > 0.8   # chance is 1 in 5


def test_select_shots_nested_and_deterministic():
    labels = np.repeat([0, 3, 1], [10, 6, 8])
    five = fewshot.select_shots(labels, 5, seed=2)
    assert five.tolist() == fewshot.select_shots(labels, 5, seed=2).tolist()
    assert labels[five].tolist() == [0] * 5 + [1] * 5 + [3] * 5
    two = fewshot.select_shots(labels, 2, seed=2)
    assert two.tolist() == five.reshape(3, 5)[:, :2].ravel().tolist()
    assert fewshot.select_shots(labels, 5, seed=3).tolist() != five.tolist()
    with pytest.raises(ValueError, match="class 3 has 6 examples.*k=7"):
        fewshot.select_shots(labels, 7)


def test_probe_errors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4))
    labels = np.repeat([0, 1], 10)
    with pytest.raises(ValueError, match="test label 5"):
        fewshot.fewshot_probe(x, labels, x[:3], np.array([0, 5, 1]), 2)
    with pytest.raises(ValueError, match="1 class"):
        fewshot.fewshot_probe(x, np.zeros(20, int), x, np.zeros(20, int), 2)
    with pytest.raises(ValueError, match="train_labels"):
        fewshot.fewshot_probe(x, labels[:5], x, labels, 2)
    with pytest.raises(ValueError, match="train features"):
        fewshot.fewshot_probe(np.full((20, 4), np.nan), labels, x, labels, 2)


def test_large_penalty_is_the_prototype_classifier():
    """Why one shot uses the largest λ: ridge then predicts like the dot product with each
    class's centred mean shot."""
    rng = np.random.default_rng(0)
    x, test = rng.normal(size=(15, 8)), rng.normal(size=(200, 8))
    codes = np.repeat(np.arange(5), 3)
    w, b = fewshot.ridge_fit(x, 2.0 * np.eye(5)[codes] - 1.0, [1e6])
    centred = x - x.mean(axis=0)
    prototypes = np.stack([centred[codes == c].mean(axis=0) for c in range(5)])
    np.testing.assert_array_equal(np.argmax(test @ w[0] + b[0], axis=1),
                                  np.argmax((test - x.mean(axis=0)) @ prototypes.T, axis=1))
