"""Contrastive losses computed block by block around a ring of devices, for batches whose B×B
logit matrix would not fit on one device.

The image and text features are global (B, D) arrays sharded on the batch dim over one mesh
axis or a tuple of axes (e.g. ("data", "fsdp")): device k holds the k-th block of b = B/n rows
of each. Device k keeps its image block; the text blocks move one device along the ring per
step (n−1 `ppermute`s), so every device meets every text block once and holds a single b×b
block of logits at a time.

Both losses have a hand-written backward pass (`jax.custom_vjp`). Autodiff of the ring would
keep every permuted copy of the text features for the backward pass; here the forward pass
keeps only its inputs (plus, for softmax, one log-sum-exp per row and per column), and the
backward pass goes round the ring again: each device recomputes its block's logits, adds the
block's gradient to its own image gradient, and adds the text side of it to a gradient
accumulator that travels with the text block. After the last block one more `ppermute` brings
every accumulator home. The scale (and bias) gradients are per-device sums, `psum`-ed.
`chunked_contrastive_metrics` goes round the same ring for the retrieval metrics of a training log.

This module imports only jax and numpy; `valign_jax.losses` re-exports its three functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

_NORMS = ("batch", "pairs")


def _at_least_f32(x):
    """bf16/f16 -> float32 (a log-sum-exp in bf16 loses too much); float32/float64 unchanged."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _ring_size(mesh: Mesh, axis_name, batch: int) -> int:
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"axis_name {axis_name!r}: mesh has no axis {missing} "
                         f"(its axes: {tuple(mesh.shape)})")
    n = int(np.prod([mesh.shape[a] for a in axes]))
    if batch % n:
        raise ValueError(f"batch {batch} is not divisible by the {n} devices on {axis_name!r}")
    return n


def _diagonal_mask(shape):
    """True on the diagonal of a block; built from iotas, so XLA fuses it into its consumer."""
    return jnp.arange(shape[0])[:, None] == jnp.arange(shape[1])[None, :]


# ---------------------------------------------------------------------------------------------
# Sigmoid (SigLIP / SAIL)
# ---------------------------------------------------------------------------------------------


def _sigmoid_block_loss(logits, positives: bool):
    """Σ −log σ(z·L) over one block: z = +1 on the diagonal of the block pairing each image
    with its own caption (positives=True), −1 everywhere else. −log σ(x) = softplus(−x)."""
    if positives:
        logits = jnp.where(_diagonal_mask(logits.shape), -logits, logits)
    return jnp.sum(jax.nn.softplus(logits))


def _sigmoid_block_dlogits(logits, positives: bool):
    """d/dL of `_sigmoid_block_loss`: σ(L) for a negative pair, −σ(−L) = σ(L) − 1 for a positive
    one (written as −σ(−L) so it keeps its precision when σ(L) is close to 1)."""
    grad = jax.nn.sigmoid(logits)
    if positives:
        grad = jnp.where(_diagonal_mask(logits.shape), -jax.nn.sigmoid(-logits), grad)
    return grad


def chunked_sigmoid(img, txt, scale, bias, *, mesh: Mesh, axis_name="data",
                    norm: str = "batch", txt_extra=None):
    """`losses.sigmoid` computed around a ring of devices, never holding the B×B matrix.

    Only the first block a device sees (its own text block) holds positives. norm="batch"
    divides the sum by B (SigLIP), "pairs" by B² (SAIL); txt_extra, a second caption set for
    the same images (multi-positive), travels round the ring beside txt and the loss is the mean
    of the two. Value and gradients equal `losses.sigmoid`.
    """
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    batch = img.shape[0]
    n = _ring_size(mesh, axis_name, batch)
    texts = (txt,) if txt_extra is None else (txt, txt_extra)
    # SigLIP: sum / B. SAIL: sum / B² ("treat every pair equally"); then the mean over captions.
    weight = 1.0 / ((batch if norm == "batch" else batch * batch) * len(texts))
    loss = _ring_sigmoid(mesh, axis_name, n, weight)
    return loss(_at_least_f32(img), tuple(_at_least_f32(t) for t in texts),
                _at_least_f32(scale), _at_least_f32(bias))


def _ring_sigmoid(mesh, axis_name, n: int, weight: float):
    """The ring sigmoid for one mesh, ring size and weight, as a custom-VJP function
    (img, texts, scale, bias) -> loss of global arrays."""
    ring = [(k, (k + 1) % n) for k in range(n)]
    sharded, replicated = P(axis_name), P()

    def forward(img, texts, scale, bias):
        def blocks_loss(texts, positives):
            return sum(_sigmoid_block_loss(scale * (img @ t.T) + bias, positives) for t in texts)

        # Step 0 (own text block, the positives) starts the sum: a literal 0.0 would give the
        # scan carry a device-invariant type that the per-device block sums contradict.
        total = blocks_loss(texts, True)

        def step(carry, _):
            texts, total = carry
            texts = jax.lax.ppermute(texts, axis_name, ring)
            return (texts, total + blocks_loss(texts, False)), None

        (_, total), _ = jax.lax.scan(step, (texts, total), None, length=n - 1)
        return jax.lax.psum(total, axis_name) * weight

    def backward(img, texts, scale, bias, g):
        g = g * weight

        def block_grads(texts, positives):
            """This device's image block against one text block per caption set: the image,
            text, scale and bias gradients of their part of the loss."""
            d_img, d_texts, d_scale, d_bias = 0.0, [], 0.0, 0.0
            for t in texts:
                d = g * _sigmoid_block_dlogits(scale * (img @ t.T) + bias, positives)
                rows = d @ t  # Σ_j d_ij t_j: the image gradient, before the scale
                d_img = d_img + scale * rows
                d_texts.append(scale * (d.T @ img))
                # Σ_ij d_ij (img_i·t_j) = Σ_i img_i·rows_i: no second pass over the block.
                d_scale = d_scale + jnp.sum(img * rows)
                d_bias = d_bias + jnp.sum(d)
            return d_img, tuple(d_texts), d_scale, d_bias

        d_img, d_texts, d_scale, d_bias = block_grads(texts, True)

        def step(carry, _):
            texts, d_texts, d_img, d_scale, d_bias = carry
            # Each text block travels with the gradient its earlier hosts gave it.
            texts, d_texts = jax.lax.ppermute((texts, d_texts), axis_name, ring)
            i, t, s, b = block_grads(texts, False)
            d_texts = tuple(a + x for a, x in zip(d_texts, t))
            return (texts, d_texts, d_img + i, d_scale + s, d_bias + b), None

        carry = (texts, d_texts, d_img, d_scale, d_bias)
        (_, d_texts, d_img, d_scale, d_bias), _ = jax.lax.scan(step, carry, None, length=n - 1)
        # Block k's accumulator is now on device k−1: one more step brings it home.
        d_texts = jax.lax.ppermute(d_texts, axis_name, ring)
        return (d_img, d_texts, jax.lax.psum(d_scale, axis_name),
                jax.lax.psum(d_bias, axis_name))

    forward_sm = jax.shard_map(forward, mesh=mesh,
                               in_specs=(sharded, sharded, replicated, replicated),
                               out_specs=replicated)
    backward_sm = jax.shard_map(backward, mesh=mesh,
                                in_specs=(sharded, sharded, replicated, replicated, replicated),
                                out_specs=(sharded, sharded, replicated, replicated))

    @jax.custom_vjp
    def loss(img, texts, scale, bias):
        return forward_sm(img, texts, scale, bias)

    def loss_fwd(img, texts, scale, bias):
        return forward_sm(img, texts, scale, bias), (img, texts, scale, bias)

    def loss_bwd(saved, g):
        grads = backward_sm(*saved, g)
        return jax.tree.map(lambda d, x: d.astype(x.dtype), grads, saved)

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


# ---------------------------------------------------------------------------------------------
# Softmax (CLIP / InfoNCE)
# ---------------------------------------------------------------------------------------------


def _logsumexp_update(m, s, logits, axis: int):
    """Fold one block into a running log-sum-exp, held as a max m and a sum s = Σ e^{L − m}:
    m' = max(m, max L), s' = s·e^{m − m'} + Σ e^{L − m'} (reduced along `axis`)."""
    m_new = jnp.maximum(m, jnp.max(logits, axis=axis))
    shift = jnp.expand_dims(m_new, axis)
    return m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - shift), axis=axis)


def _logsumexp_start(logits, axis: int):
    m = jnp.max(logits, axis=axis)
    return m, jnp.sum(jnp.exp(logits - jnp.expand_dims(m, axis)), axis=axis)


def chunked_softmax_contrastive(img, txt, scale, *, mesh: Mesh, axis_name="data"):
    """`losses.softmax_contrastive` computed around a ring of devices, never holding the B×B
    matrix: ½ (cross-entropy over rows + over columns) of scale·img·txtᵀ.

    Rows (image→text): device k folds each text block it meets into a running log-sum-exp of
    its image rows. Columns (text→image): each text block carries the running log-sum-exp of
    its own columns round the ring with it, and every device folds its image block in. Value
    and gradients (image, text, scale) equal `losses.softmax_contrastive`.
    """
    n = _ring_size(mesh, axis_name, img.shape[0])
    loss = _ring_softmax(mesh, axis_name, n, 0.5 / img.shape[0])
    return loss(_at_least_f32(img), _at_least_f32(txt), _at_least_f32(scale))


def _ring_softmax(mesh, axis_name, n: int, weight: float):
    """The ring softmax for one mesh, ring size and weight 1/(2B), as a custom-VJP function
    (img, txt, scale) -> loss of global arrays."""
    ring = [(k, (k + 1) % n) for k in range(n)]
    sharded, replicated = P(axis_name), P()

    def forward(img, txt, scale):
        logits = scale * (img @ txt.T)
        m_row, s_row = _logsumexp_start(logits, 1)
        m_col, s_col = _logsumexp_start(logits, 0)

        def step(carry, _):
            txt, m_col, s_col, m_row, s_row = carry
            txt, m_col, s_col = jax.lax.ppermute((txt, m_col, s_col), axis_name, ring)
            logits = scale * (img @ txt.T)
            m_row, s_row = _logsumexp_update(m_row, s_row, logits, 1)
            m_col, s_col = _logsumexp_update(m_col, s_col, logits, 0)
            return (txt, m_col, s_col, m_row, s_row), None

        carry = (txt, m_col, s_col, m_row, s_row)
        (_, m_col, s_col, m_row, s_row), _ = jax.lax.scan(step, carry, None, length=n - 1)
        # The column statistics of text block k are on device k−1: one step brings them home.
        m_col, s_col = jax.lax.ppermute((m_col, s_col), axis_name, ring)
        lse_row, lse_col = m_row + jnp.log(s_row), m_col + jnp.log(s_col)
        positives = scale * jnp.sum(img * txt, axis=1)  # L_ii, both directions' targets
        total = jnp.sum(lse_row) + jnp.sum(lse_col) - 2 * jnp.sum(positives)
        return jax.lax.psum(total, axis_name) * weight, (lse_row, lse_col)

    def backward(img, txt, scale, lse_row, lse_col, g):
        g = g * weight
        # The targets' term −2·Σ_i L_ii, with L_ii = scale·img_i·txt_i.
        d_img, d_txt, d_scale = -2 * g * scale * txt, -2 * g * scale * img, -2 * g * jnp.sum(
            img * txt)

        def block_grads(txt, lse_col):
            """This device's image block against one text block: dL_ij = g·(softmax over row
            i + softmax over column j), recomputed from the logits and the saved log-sum-exps."""
            logits = scale * (img @ txt.T)
            d = g * (jnp.exp(logits - lse_row[:, None]) + jnp.exp(logits - lse_col[None, :]))
            rows = d @ txt
            return scale * rows, scale * (d.T @ img), jnp.sum(img * rows)

        i, t, s = block_grads(txt, lse_col)
        d_img, d_txt, d_scale = d_img + i, d_txt + t, d_scale + s

        def step(carry, _):
            txt, lse_col, d_txt, d_img, d_scale = carry
            txt, lse_col, d_txt = jax.lax.ppermute((txt, lse_col, d_txt), axis_name, ring)
            i, t, s = block_grads(txt, lse_col)
            return (txt, lse_col, d_txt + t, d_img + i, d_scale + s), None

        carry = (txt, lse_col, d_txt, d_img, d_scale)
        (_, _, d_txt, d_img, d_scale), _ = jax.lax.scan(step, carry, None, length=n - 1)
        d_txt = jax.lax.ppermute(d_txt, axis_name, ring)
        return d_img, d_txt, jax.lax.psum(d_scale, axis_name)

    forward_sm = jax.shard_map(forward, mesh=mesh, in_specs=(sharded, sharded, replicated),
                               out_specs=(replicated, (sharded, sharded)))
    backward_sm = jax.shard_map(
        backward, mesh=mesh,
        in_specs=(sharded, sharded, replicated, sharded, sharded, replicated),
        out_specs=(sharded, sharded, replicated))

    @jax.custom_vjp
    def loss(img, txt, scale):
        return forward_sm(img, txt, scale)[0]

    def loss_fwd(img, txt, scale):
        value, (lse_row, lse_col) = forward_sm(img, txt, scale)
        return value, (img, txt, scale, lse_row, lse_col)

    def loss_bwd(saved, g):
        grads = backward_sm(*saved, g)
        return tuple(d.astype(x.dtype) for d, x in zip(grads, saved[:3]))

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


# ---------------------------------------------------------------------------------------------
# Metrics: what `losses.contrastive_metrics` reports, without the B×B matrix
# ---------------------------------------------------------------------------------------------


def chunked_contrastive_metrics(img, txt, scale, bias=None, *, mesh: Mesh, axis_name="data"):
    """`losses.contrastive_metrics` computed around the ring (forward only, no gradient).

    An image counts as retrieved (i2t accuracy) when its own caption's logit is the first
    maximum of its row, exactly as argmax decides: it must beat every earlier column strictly
    and tie at most with later ones. Rows fold in each text block as it passes; each text block
    carries its columns' verdicts (t2i) round the ring with it.
    """
    batch = img.shape[0]
    n = _ring_size(mesh, axis_name, batch)
    ring = [(k, (k + 1) % n) for k in range(n)]
    img, txt, scale = _at_least_f32(img), _at_least_f32(txt), _at_least_f32(scale)
    bias = jnp.zeros((), scale.dtype) if bias is None else _at_least_f32(bias)

    def per_device(img, txt, scale, bias):
        local = img.shape[0]
        me = jax.lax.axis_index(axis_name)
        rows = me * local + jnp.arange(local)  # global indices of this device's images

        def verdicts(logits, row_best, col_best, cols):
            """Does each row's (column's) positive stay its first maximum against this block?"""
            # A competitor earlier in the argmax's order must be beaten strictly.
            col_first = cols[None, :] < rows[:, None]  # in row i, column j comes before i
            row_first = rows[:, None] < cols[None, :]  # in column j, row i comes before j
            row_ok = jnp.where(col_first, row_best[:, None] > logits, row_best[:, None] >= logits)
            col_ok = jnp.where(row_first, col_best[None, :] > logits, col_best[None, :] >= logits)
            return jnp.all(row_ok, axis=1), jnp.all(col_ok, axis=0)

        logits = scale * (img @ txt.T) + bias
        positive = jnp.diagonal(logits)  # from the block itself: ties compare like with like
        row_hit, col_hit = verdicts(logits, positive, positive, rows)
        total = jnp.sum(logits)

        def step(carry, s):
            txt, col_best, col_hit, row_hit, total = carry
            txt, col_best, col_hit = jax.lax.ppermute((txt, col_best, col_hit), axis_name, ring)
            cols = ((me - s) % n) * local + jnp.arange(local)  # the block came from device me−s
            logits = scale * (img @ txt.T) + bias
            rows_ok, cols_ok = verdicts(logits, positive, col_best, cols)
            return (txt, col_best, col_hit & cols_ok, row_hit & rows_ok,
                    total + jnp.sum(logits)), None

        carry = (txt, positive, col_hit, row_hit, total)
        (_, _, col_hit, row_hit, total), _ = jax.lax.scan(step, carry, jnp.arange(1, n))
        col_hit = jax.lax.ppermute(col_hit, axis_name, ring)  # home, as for the losses
        return jax.lax.psum((jnp.sum(row_hit.astype(jnp.float32)),
                             jnp.sum(col_hit.astype(jnp.float32)), jnp.sum(positive), total),
                            axis_name)

    row_hits, col_hits, positives, total = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(axis_name), P(axis_name), P(), P()),
        out_specs=P())(img, txt, scale, bias)
    negatives = batch * (batch - 1)
    return {
        "i2t_accuracy": row_hits / batch,
        "t2i_accuracy": col_hits / batch,
        "mean_positive_logit": positives / batch,
        # NaN for B = 1 (there are no negatives), as the dense metrics.
        "mean_negative_logit": (total - positives) / negatives if negatives else
        jnp.full((), jnp.nan, total.dtype),
    }
