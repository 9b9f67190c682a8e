"""Alignment losses: contrastive (CLIP), sigmoid (SigLIP / SAIL), RaFA + HyCD (CLIP-Refine).

The exact math is in docs/methods.md §1–3 and §9. Every loss returns a float32 scalar (float64
for float64 inputs) whatever the input dtype: bf16 logits lose too much precision inside a
log-sum-exp. Plain `softmax_contrastive` / `sigmoid` are
ordinary jnp code, so under `jit` with batch-sharded inputs they see the global batch and every
device's negatives. `chunked_softmax_contrastive` / `chunked_sigmoid` (from `ring_losses`, and
re-exported here) are the memory-bounded variants for batches whose B×B logit matrix would not
fit on one device: the same value and gradients, computed block by block around a ring
(`chunked_contrastive_metrics` likewise for `contrastive_metrics`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# The ring forms of the contrastive losses and metrics live in their own module; re-exported here.
from valign_jax.ring_losses import (  # noqa: F401
    chunked_contrastive_metrics, chunked_sigmoid, chunked_softmax_contrastive)


def _at_least_f32(x):
    """Upcast bf16/f16 to float32; leave float32/float64 alone (float64 keeps the tests exact)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Logit-scale conventions. Everything is stored as a log-scale t' (scale = exp(t')), because
# that is what the models learn; LiLT's temperature bounds [0.001, 0.5] become scale [2, 1000].
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogitScalePreset:
    init_log_scale: float
    init_bias: float | None  # None: the recipe has no logit bias
    min_log_scale: float | None  # None: unbounded on that side
    max_log_scale: float | None


LOGIT_SCALE_PRESETS = {
    # CLIP: scale capped at 100. The lower bound 0 (scale >= 1) is the open_clip / OpenAI training
    # convention; it never binds in practice.
    "clip": LogitScalePreset(math.log(1 / 0.07), None, 0.0, math.log(100.0)),
    # SigLIP (big_vision): t' = log 10, b = -10, no clamping.
    "siglip": LogitScalePreset(math.log(10.0), -10.0, None, None),
    # SAIL: t = 20, b = -10; t' clamped to [0, log 100] after each step.
    "sail": LogitScalePreset(math.log(20.0), -10.0, 0.0, math.log(100.0)),
    # LiLT: temperature 0.07 clamped to [0.001, 0.5] -> scale = 1/temperature in [2, 1000].
    "lilt": LogitScalePreset(math.log(1 / 0.07), None, math.log(2.0), math.log(1000.0)),
}


def clamp_log_scale(log_scale, recipe: str | LogitScalePreset):
    """Clamp a learnable log-scale to the recipe's bounds (call after each optimiser step)."""
    preset = LOGIT_SCALE_PRESETS[recipe] if isinstance(recipe, str) else recipe
    return jnp.clip(log_scale, preset.min_log_scale, preset.max_log_scale)


# ---------------------------------------------------------------------------------------------
# §1 Contrastive (InfoNCE)
# ---------------------------------------------------------------------------------------------


def softmax_contrastive(img, txt, scale):
    """CLIP loss: ½ (CE over rows + CE over columns) of scale·img·txtᵀ, targets on the diagonal.

    img, txt: L2-normalised (B, D); scale = exp(log-scale), exponentiated by the caller.
    """
    img, txt = _at_least_f32(img), _at_least_f32(txt)
    logits = _at_least_f32(scale) * img @ txt.T
    # The diagonal of log_softmax over rows (image->text) and over columns (text->image).
    i2t = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
    t2i = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0))
    return 0.5 * (i2t.mean() + t2i.mean())


# ---------------------------------------------------------------------------------------------
# §2 Sigmoid (SigLIP / SAIL)
# ---------------------------------------------------------------------------------------------

_NORMS = ("batch", "pairs")


def _sigmoid_sum(img, txt, scale, bias):
    """Σ_ij −log σ(z_ij · (scale·img_i·txt_j + bias)), z_ij = +1 if i = j else −1."""
    logits = scale * img @ txt.T + bias
    z = 2 * jnp.eye(*logits.shape, dtype=logits.dtype) - 1
    return -jnp.sum(jax.nn.log_sigmoid(z * logits))


def _sigmoid_denominator(batch: int, norm: str) -> int:
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    # SigLIP: sum / B. SAIL: sum / B² ("treat every pair equally").
    return batch if norm == "batch" else batch * batch


def sigmoid(img, txt, scale, bias, norm: str = "batch", txt_extra=None):
    """Pairwise sigmoid loss over all B×B pairs of the (global) batch.

    norm="batch" divides the sum by B (SigLIP), norm="pairs" by B² (SAIL). txt_extra: a second
    caption set for the same images (SAIL Eq. 2 multi-positive); the loss is then the mean of the
    two single-caption losses, with the same labels.
    """
    img, txt = _at_least_f32(img), _at_least_f32(txt)
    scale, bias = _at_least_f32(scale), _at_least_f32(bias)
    denom = _sigmoid_denominator(img.shape[0], norm)
    loss = _sigmoid_sum(img, txt, scale, bias) / denom
    if txt_extra is not None:
        extra = _sigmoid_sum(img, _at_least_f32(txt_extra), scale, bias) / denom
        loss = 0.5 * (loss + extra)
    return loss


# ---------------------------------------------------------------------------------------------
# §3 CLIP-Refine: RaFA + HyCD
# ---------------------------------------------------------------------------------------------


def sample_rafa_reference(rng, batch: int, dim: int, std: float = 1.0):
    """r_i ~ N(0, std² I_D), one (un-normalised) vector per pair, shared by its image and text."""
    return std * jax.random.normal(rng, (batch, dim), dtype=jnp.float32)


def rafa(z_img, z_txt, ref, form: str = "official"):
    """Random feature alignment: pull both modalities' un-normalised features toward r_i.

    form="official" (authors' code, default): mean_{i,d}(z_img−r)² + mean_{i,d}(z_txt−r)².
    form="paper": (1/2B) Σ_i (‖z_img_i−r_i‖² + ‖z_txt_i−r_i‖²) = official × D/2.
    """
    z_img, z_txt, ref = _at_least_f32(z_img), _at_least_f32(z_txt), _at_least_f32(ref)
    official = jnp.mean((z_img - ref) ** 2) + jnp.mean((z_txt - ref) ** 2)
    if form == "official":
        return official
    if form == "paper":
        return official * (z_img.shape[-1] / 2)
    raise ValueError(f"form must be 'official' or 'paper', got {form!r}")


def _hybrid_kd_one_direction(student_logits, teacher_logits, alpha, temperature):
    """KL(q̂ ‖ softmax(Ls/T)) averaged over rows, q̂ = α·I + (1−α)·softmax(Lt/T) row-wise."""
    q = alpha * jnp.eye(*teacher_logits.shape, dtype=teacher_logits.dtype)
    q = q + (1 - alpha) * jax.nn.softmax(teacher_logits / temperature, axis=1)
    log_p = jax.nn.log_softmax(student_logits / temperature, axis=1)
    # xlogy makes 0·log 0 = 0, so α = 1 (q̂ = I exactly) is plain cross-entropy, as torch kl_div.
    kl = jnp.sum(jax.scipy.special.xlogy(q, q) - q * log_p, axis=1)
    return kl.mean()


def hycd(s_img, s_txt, t_img, t_txt, alpha: float = 0.5, temperature: float = 1.0):
    """Hybrid contrastive distillation from a frozen teacher (CLIP-Refine).

    Logits are raw dot products of the given features (the official code uses no logit scale);
    the teacher's features get stop_gradient. Returns ½ (image→text + text→image) × T².
    """
    s_img, s_txt = _at_least_f32(s_img), _at_least_f32(s_txt)
    t_img = jax.lax.stop_gradient(_at_least_f32(t_img))
    t_txt = jax.lax.stop_gradient(_at_least_f32(t_txt))
    student, teacher = s_img @ s_txt.T, t_img @ t_txt.T
    i2t = _hybrid_kd_one_direction(student, teacher, alpha, temperature)
    t2i = _hybrid_kd_one_direction(student.T, teacher.T, alpha, temperature)
    return 0.5 * (i2t + t2i) * temperature**2


# ---------------------------------------------------------------------------------------------
# Image–text matching (the fusion re-ranker, docs/methods.md §6)
# ---------------------------------------------------------------------------------------------


def sample_hard_negatives(rng, similarity, positives):
    """One negative column per row, drawn with probability softmax(similarity[i]) over the
    columns that are not positives: hard negatives, the ones the dual encoder confuses.

    similarity: (B, B) logits (no gradient flows through the draw). positives: (B, B) bool,
    True where column j is as right as the row's own (an identical caption); the diagonal is
    always a positive and is never returned. Returns (indices (B,), valid (B,)): valid is False
    for a row with no negative at all, whose index is then meaningless.
    """
    batch = similarity.shape[0]
    forbidden = positives | jnp.eye(batch, dtype=bool)
    valid = ~forbidden.all(axis=1)
    logits = jnp.where(forbidden, -jnp.inf, jax.lax.stop_gradient(_at_least_f32(similarity)))
    logits = jnp.where(valid[:, None], logits, 0.0)  # no all -inf row reaches categorical
    return jax.random.categorical(rng, logits, axis=-1), valid


def itm(positive_logits, negative_logits, negative_valid):
    """Binary cross-entropy of the match head: (B,) positive logits against the negatives'
    (lists of (B,) logits and their (B,) valid masks), averaged over every scored pair."""
    pos = _at_least_f32(positive_logits)
    total = jnp.sum(jax.nn.softplus(-pos))            # -log sigmoid(x): label 1
    count = jnp.asarray(pos.shape[0], jnp.float32)
    for logits, valid in zip(negative_logits, negative_valid):
        weight = valid.astype(jnp.float32)
        total += jnp.sum(weight * jax.nn.softplus(_at_least_f32(logits)))  # label 0
        count += weight.sum()
    return total / count


# ---------------------------------------------------------------------------------------------
# Metrics (not losses): what a training log wants to see next to the loss.
# ---------------------------------------------------------------------------------------------


def contrastive_metrics(img, txt, scale, bias=None) -> dict:
    """In-batch retrieval accuracy and the mean positive / negative logit.

    i2t_accuracy: fraction of images whose highest-scoring caption is their own (t2i likewise).
    mean_negative_logit is NaN for B = 1 (there are no negatives).
    """
    img, txt = _at_least_f32(img), _at_least_f32(txt)
    logits = _at_least_f32(scale) * img @ txt.T
    if bias is not None:
        logits = logits + _at_least_f32(bias)
    batch = logits.shape[0]
    idx = jnp.arange(batch)
    is_positive = jnp.eye(batch, dtype=bool)
    num_negatives = batch * (batch - 1)
    mean_negative = jnp.sum(jnp.where(is_positive, 0, logits)) / max(num_negatives, 1)
    if not num_negatives:
        mean_negative = jnp.full((), jnp.nan, logits.dtype)
    return {
        "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == idx),
        "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == idx),
        "mean_positive_logit": jnp.mean(jnp.diagonal(logits)),
        "mean_negative_logit": mean_negative,
    }
