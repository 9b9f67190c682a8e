"""Few-shot linear probes on frozen image features: how much of each class a handful of labelled
examples can find in the vision tower's space.

For each k, k examples of every class are drawn from a labelled pool (deterministic: class c's
examples in the order of np.random.default_rng([seed, c]).permutation, and the first k, so the
5 shots hold the 1 shot), a linear classifier is fitted in closed form, and its top-1 accuracy on
the test features is reported. The classifier is ridge regression (least squares with an L2
penalty) from features to one-hot targets written as +1 / -1, with an intercept the penalty
does not touch:

    minimise over W, b   ‖X W + 1 bᵀ − Y‖² + λ ‖W‖²
    ⇒ W = (X̄ᵀ X̄ + λ I)⁻¹ X̄ᵀ Ȳ,  b = mean(Y) − mean(X) W    (X̄, Ȳ: X, Y centred)

computed from one eigendecomposition of X̄'s Gram matrix for every λ of the grid. With a free
intercept, +1/−1 and 0/1 targets give the same predictions (every logit becomes 2 × itself − 1),
so the choice is moot.

Features: each row L2-normalised; with centre=True the mean of the normalised shots is then
subtracted from shots and test alike and the rows normalised again (SimpleShot's CL2N).

λ comes from a small grid (REGS), chosen on the shots alone, never the test split: fold f holds
out the f-th shot of every class and fits on the rest, for min(k, MAX_FOLDS) folds; the λ with
the best mean held-out accuracy wins, ties going to the larger λ (the safer one with few shots).
With k = 1 there is nothing to hold out and the largest λ is used: as λ grows, ridge tends to
the class-prototype classifier (dot product with each class's centred mean shot), the usual
one-shot choice.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from valign_jax.evaluation.geometry import l2_normalize

REGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
MAX_FOLDS = 5
_BLOCK_ELEMENTS = 1 << 22   # ~32 MiB of float64 logits per block


def _check_labels(labels, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: expected {n} integer labels (one per feature row), got shape "
                         f"{labels.shape} dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0, got {int(labels.min())}")
    return labels.astype(np.int64)


def select_shots(labels, k: int, seed: int = 0) -> np.ndarray:
    """Indices of k examples of every class in `labels` (class by class, in class order; the
    shots of class c are the first k of its examples in a permutation seeded by (seed, c))."""
    labels = _check_labels(labels, len(np.asarray(labels)), "labels")
    if int(k) != k or k < 1:
        raise ValueError(f"k={k}: shots per class must be a positive integer")
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise ValueError(f"class {int(c)} has {len(members)} examples in the few-shot pool, "
                             f"fewer than k={int(k)}")
        chosen.append(members[np.random.default_rng([int(seed), int(c)]).permutation(
            len(members))[:int(k)]])
    return np.concatenate(chosen)


def prepare(shots, test=None, centre: bool = False):
    """(shots, test) L2-normalised, and with centre=True centred on the shots' mean and
    normalised again. test may be None."""
    x = l2_normalize(shots, "train features")
    t = None if test is None else l2_normalize(test, "test features")
    if t is not None and t.shape[1] != x.shape[1]:
        raise ValueError(f"feature dims differ: train {x.shape} vs test {t.shape}")
    if centre:
        mean = x.mean(axis=0)
        x = l2_normalize(x - mean, "centred train features")
        t = None if t is None else l2_normalize(t - mean, "centred test features")
    return x, t


def ridge_fit(x, targets, regs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with a free intercept for every λ in regs, from one eigendecomposition.

    x (N, D), targets (N, C) -> (W (R, D, C), b (R, C)) minimising
    ‖x W + 1 bᵀ − targets‖² + λ ‖W‖². The smaller Gram matrix is decomposed: X̄ᵀX̄ (D × D) when
    N >= D, else X̄X̄ᵀ (N × N) with W = X̄ᵀ (X̄X̄ᵀ + λ I)⁻¹ Ȳ; a matrix product and a symmetric
    eigensolver, cheaper than an SVD of X̄ and as accurate here, since λ > 0 swamps the rounding
    of the smallest eigenvalues."""
    x = np.asarray(x, np.float64)
    y = np.asarray(targets, np.float64)
    regs = np.asarray(regs, np.float64)
    if regs.ndim != 1 or not len(regs) or (regs <= 0).any():
        raise ValueError(f"regs: expected positive regularisation strengths, got {regs}")
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    if len(x) >= x.shape[1]:
        e, q = np.linalg.eigh(xc.T @ xc)
        qty = q.T @ (xc.T @ yc)                            # (D, C)
        w = q[None] @ (qty[None] / (np.maximum(e, 0.0)[None, :, None] + regs[:, None, None]))
    else:
        e, q = np.linalg.eigh(xc @ xc.T)
        qty = q.T @ yc                                     # (N, C)
        dual = q[None] @ (qty[None] / (np.maximum(e, 0.0)[None, :, None] + regs[:, None, None]))
        w = xc.T[None] @ dual
    b = y_mean[None, :] - x_mean @ w
    return w, b


def _targets(codes: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot as +1 / -1."""
    return 2.0 * np.eye(num_classes)[codes] - 1.0


def _accuracies(x, w, b, codes) -> np.ndarray:
    """Top-1 accuracy of each (W, b) on features x with class codes (ties: lower class), in
    row blocks so a 50k-image, 1000-class test split stays small in memory."""
    correct = np.zeros(len(w))
    step = max(1, _BLOCK_ELEMENTS // (w.shape[0] * w.shape[2]))
    for start in range(0, len(x), step):
        logits = x[start:start + step][None] @ w + b[:, None, :]   # (R, n, C)
        correct += (np.argmax(logits, axis=2) == codes[None, start:start + step]).sum(axis=1)
    return correct / len(x)


def choose_reg(x, codes, shot_rank, num_classes: int, regs: Sequence[float] = REGS,
               max_folds: int = MAX_FOLDS) -> float:
    """λ from `regs` by held-out accuracy over the shots (see the module docstring).

    x (N, D) prepared shot features, codes (N,) class codes in [0, num_classes), shot_rank (N,)
    each shot's position among its class's shots (0 .. k-1)."""
    k = int(shot_rank.max()) + 1
    if k == 1:
        return float(max(regs))
    folds = min(k, int(max_folds))
    accuracy = np.zeros(len(regs))
    for f in range(folds):
        held = shot_rank == f
        w, b = ridge_fit(x[~held], _targets(codes[~held], num_classes), regs)
        accuracy += _accuracies(x[held], w, b, codes[held])
    best = np.flatnonzero(accuracy == accuracy.max())
    return float(max(np.asarray(regs, np.float64)[best]))


def _check_classes(classes, test_labels, n_test: int) -> np.ndarray:
    """The test labels, checked: 2+ pool classes, every test label one of them."""
    test_labels = _check_labels(test_labels, n_test, "test_labels")
    if len(classes) < 2:
        raise ValueError(f"the few-shot pool holds {len(classes)} class(es); a probe needs 2+")
    unknown = ~np.isin(test_labels, classes)
    if unknown.any():
        raise ValueError(f"test label {int(test_labels[np.argmax(unknown)])} is no class of the "
                         f"few-shot pool ({int(unknown.sum())} test rows)")
    return test_labels


def fewshot_probe(train_features, train_labels, test_features, test_labels, k: int,
                  seed: int = 0, centre: bool = False, regs: Sequence[float] = REGS,
                  max_folds: int = MAX_FOLDS) -> tuple[float, float]:
    """(test accuracy, chosen λ) of a k-shot ridge probe; train_* are the labelled pool the
    shots come from (every class in it needs k examples), test labels must be pool classes."""
    train_labels = _check_labels(train_labels, len(np.asarray(train_features)), "train_labels")
    _check_classes(np.unique(train_labels), test_labels, len(np.asarray(test_features)))
    chosen = select_shots(train_labels, k, seed)
    return probe_shots(np.asarray(train_features)[chosen], train_labels[chosen], test_features,
                       test_labels, k, centre, regs, max_folds)


def probe_shots(shot_features, shot_labels, test_features, test_labels, k: int,
                centre: bool = False, regs: Sequence[float] = REGS,
                max_folds: int = MAX_FOLDS) -> tuple[float, float]:
    """(test accuracy, chosen λ) of the probe fitted on exactly these shots: k of every class,
    class-major, as `select_shots` orders them (the held-out folds take each class's f-th
    shot). An evaluator that embeds only the shots it needs calls this directly."""
    shot_labels = _check_labels(shot_labels, len(np.asarray(shot_features)), "shot_labels")
    classes = np.unique(shot_labels)
    test_labels = _check_classes(classes, test_labels, len(np.asarray(test_features)))
    if len(shot_labels) != len(classes) * int(k) or not (
            shot_labels.reshape(len(classes), int(k)) == classes[:, None]).all():
        raise ValueError(f"shot_labels: expected {int(k)} shots of every class, class by class "
                         f"(select_shots' order), got {len(shot_labels)} labels")
    x, t = prepare(shot_features, test_features, centre)
    codes = np.searchsorted(classes, shot_labels)
    shot_rank = np.tile(np.arange(int(k)), len(classes))
    reg = choose_reg(x, codes, shot_rank, len(classes), regs, max_folds)
    w, b = ridge_fit(x, _targets(codes, len(classes)), [reg])
    accuracy = _accuracies(t, w, b, np.searchsorted(classes, test_labels))[0]
    return float(accuracy), reg


def fewshot_metrics(train_features, train_labels, test_features, test_labels,
                    shots: Sequence[int] = (1, 5, 10), seed: int = 0, centre: bool = False,
                    regs: Sequence[float] = REGS,
                    max_folds: int = MAX_FOLDS) -> dict[str, float]:
    """{"1shot": accuracy, "5shot": ..., ...}: a `fewshot_probe` for each k in shots."""
    if not len(shots):
        raise ValueError("shots: expected at least one k")
    return {f"{int(k)}shot": fewshot_probe(train_features, train_labels, test_features,
                                           test_labels, k, seed, centre, regs, max_folds)[0]
            for k in shots}
