"""Building blocks shared by every tower: attention, masks, activations, the layer stack
(unrolled, remat-ed or `nn.scan`-ned) and position-embedding interpolation.

Every tower calls the same `dot_product_attention`; only the parameter names around it differ,
because each family keeps Hugging Face's names so checkpoints load by name.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Activations by the names Hugging Face configs use (`hidden_act`). "gelu" is the exact (erf) form in
# HF; flax's nn.gelu defaults to the tanh approximation, which would cost ~1e-4 of agreement.
ACTIVATIONS: dict[str, Callable] = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """(B, L) 1/0 mask of real tokens -> (B, 1, 1, L) boolean mask over keys."""
    return attention_mask.astype(bool)[:, None, None, :]


def masked_mean(hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Mean over the real tokens of (B, L, D) hidden states; all tokens when no mask is given."""
    if attention_mask is None:
        return hidden.mean(axis=1)
    weights = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1)


def causal_mask(length: int) -> jax.Array:
    """(1, 1, L, L) boolean mask: query i sees keys j <= i."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def xla_attention(q, k, v, mask=None):
    """Scaled dot-product attention over (B, L, H, Dh) heads, as plain einsums XLA fuses.

    mask: boolean, broadcastable to (B, H, Lq, Lk), True where a query may attend a key.
    The softmax runs in float32 whatever the compute dtype, so bf16 towers stay close to fp32.
    """
    depth = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(depth)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def fused_attention(q, k, v, mask=None, implementation: str | None = None):
    """jax.nn.dot_product_attention on the same (B, L, H, Dh) layout and boolean mask."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def cudnn_attention(q, k, v, mask=None):
    """jax's fused cuDNN (flash) attention kernel: NVIDIA GPUs, bf16/fp16 compute only.

    Refused with a clear error elsewhere rather than silently falling back, so a config that
    asks for the fused kernel never measures the unfused one by accident.
    """
    backend = jax.default_backend()
    if backend != "gpu":
        raise ValueError(f"attention_impl='cudnn' runs jax's fused cuDNN kernel, which needs an "
                         f"NVIDIA GPU; this process's jax backend is {backend!r}. Use "
                         f"attention_impl='xla' (the same attention, unfused).")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl='cudnn' needs a bfloat16 or float16 compute dtype; "
                         f"this tower computes in {q.dtype}. Set the tower's dtype='bfloat16' "
                         f"(config.model.dtype) or attention_impl='xla'.")
    return kernel_ready_attention(q, k, v, mask, "cudnn")


def kernel_ready_attention(q, k, v, mask=None, implementation: str | None = None):
    """fused_attention with its inputs in the form jax's cuDNN path accepts when training.

    The mask is broadcast to full (B, 1, Lq, Lk) length, the only mask shape the kernel takes.
    An odd sequence length (ViT-B/16 at 224 px: 197 tokens) is refused, so it is padded by one
    token that no query attends; without a mask the padding is excluded by sequence lengths,
    which keeps cuDNN's bias-free kernel. The tests run this with implementation="xla".
    """
    length = q.shape[1]
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], 1, length, k.shape[1]))
    if length % 2 == 0:
        return fused_attention(q, k, v, mask, implementation)
    pad = lambda t: jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0)))
    if mask is None:
        lengths = jnp.full((q.shape[0],), length, jnp.int32)
        out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), query_seq_lengths=lengths,
                                           key_value_seq_lengths=lengths,
                                           implementation=implementation)
    else:  # the padded key is masked out; the padded query's row is dropped below
        out = fused_attention(pad(q), pad(k), pad(v), jnp.pad(mask, ((0, 0), (0, 0), (0, 1),
                                                                      (0, 1))), implementation)
    return out[:, :length]


# config.attention_impl -> the function computing attention. Looked up at call time.
ATTENTION = {"xla": xla_attention, "cudnn": cudnn_attention}
ATTENTION_IMPLS = ("auto", *ATTENTION)


def resolve_attention(implementation: str, dtype) -> str:
    """"auto": the fused cuDNN kernel where it runs, NVIDIA GPUs computing in bf16/fp16 (a
    ViT-B/16 + BERT-base step took 0.84 of the XLA attention's time on an H200, within bf16
    tolerance: BENCHMARKS.md); XLA's attention everywhere else."""
    if implementation != "auto":
        return implementation
    fused = jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
    return "cudnn" if fused else "xla"


def dot_product_attention(q, k, v, mask=None, implementation: str = "auto"):
    """Attention by `implementation` (a tower's attention_impl: "auto" or a key of ATTENTION)."""
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={implementation!r}; expected one of "
                         f"{list(ATTENTION_IMPLS)}")
    return ATTENTION[resolve_attention(implementation, q.dtype)](q, k, v, mask)


class SelfAttention(nn.Module):
    """Multi-head self-attention with HF-named q/k/v projections.

    `names` are the three projection names (BERT/ViT: query/key/value; CLIP: q_proj/k_proj/v_proj).
    `out_name` adds the output projection inside this module (CLIP's out_proj); BERT and ViT keep
    theirs in a sibling module, so for them it is None and the caller projects.
    """

    num_heads: int
    names: tuple[str, str, str] = ("query", "key", "value")
    out_name: str | None = None
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, mask=None):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"hidden size {width} is not divisible by num_heads={self.num_heads}")
        heads = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, width // self.num_heads))
        q, k, v = (heads(nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype, name=n)(x))
                   for n in self.names)
        out = dot_product_attention(q, k, v, mask, self.attention_impl)
        out = out.reshape(out.shape[:2] + (width,))
        if self.out_name is not None:
            out = nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype, name=self.out_name)(out)
        return out


class Adapter(nn.Module):
    """Houlsby bottleneck adapter: h + W_up GELU(W_down h).

    LiLT initialises both projections N(0, 0.02) with zero biases; `identity=True` zeroes W_up
    instead, so a freshly inserted adapter leaves the pretrained tower's output unchanged.
    """

    bottleneck: int
    identity: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        init = nn.initializers.normal(0.02)
        inner = nn.Dense(self.bottleneck, kernel_init=init, dtype=self.dtype, name="down")(hidden)
        inner = nn.gelu(inner, approximate=False)
        up_init = nn.initializers.zeros if self.identity else init
        return hidden + nn.Dense(hidden.shape[-1], kernel_init=up_init, dtype=self.dtype,
                                 name="up")(inner)


def maybe_adapter(config, hidden, name: str):
    """`config`'s adapter named `name` applied to `hidden`, or `hidden` when adapters are off.
    Call inside a compact method."""
    if not config.adapter_dim:
        return hidden
    return Adapter(config.adapter_dim, config.adapter_init == "identity",
                   config.compute_dtype, name=name)(hidden)


# --------------------------------------------------------------------------------------------
# Heads: what sits between a tower's pooled features and the shared embedding space
# --------------------------------------------------------------------------------------------

class GLUHead(nn.Module):
    """SAIL's alignment layer ("star" MLP): y = W_g(ReLU6(W_1 h + b_1) * (W_2 h + b_2)),
    h = LN(x); W_1, W_2: in -> width_factor*in; activations clamped to +-clamp; Xavier-uniform
    weights, zero biases, no residual."""

    features: int
    width_factor: int = 8
    clamp: float = 1e3

    @nn.compact
    def __call__(self, x):
        dense = lambda n, f: nn.Dense(f, kernel_init=nn.initializers.xavier_uniform(), name=n)
        h = nn.LayerNorm(name="norm")(x)
        width = self.width_factor * x.shape[-1]
        gated = nn.relu6(dense("w1", width)(h)) * dense("w2", width)(h)
        return dense("out", self.features)(jnp.clip(gated, -self.clamp, self.clamp))


class MLPHead(nn.Module):
    """LN -> Dense(4*in) -> GELU -> Dense(features)."""

    features: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(x)
        h = nn.gelu(nn.Dense(4 * x.shape[-1], name="fc1")(h), approximate=False)
        return nn.Dense(self.features, name="fc2")(h)


class Identity(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x


HEADS = ("linear", "glu", "mlp", "identity")


def make_head(kind: str, features: int, use_bias: bool, name: str) -> nn.Module:
    """A head by name. "linear" is CLIP's projection (bias-free unless use_bias)."""
    if kind == "linear":
        return nn.Dense(features, use_bias=use_bias, kernel_init=nn.initializers.normal(0.02),
                        name=name)
    if kind == "glu":
        return GLUHead(features, name=name)
    if kind == "mlp":
        return MLPHead(features, name=name)
    if kind == "identity":
        return Identity(name=name)
    raise ValueError(f"head={kind!r}; expected one of {HEADS}")


# --------------------------------------------------------------------------------------------
# The stack of layers: unrolled (HF layout "0", "1", ...) or scanned (one stacked set of weights)
# --------------------------------------------------------------------------------------------

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class _Unrolled(nn.Module):
    """Layers "0", "1", ... as in HF checkpoints, applied in sequence."""

    layer_cls: Any
    num_layers: int
    layer_kwargs: tuple  # (key, value) pairs: module attributes must be hashable

    @nn.compact
    def __call__(self, hidden, mask):
        for i in range(self.num_layers):
            hidden, _ = self.layer_cls(**dict(self.layer_kwargs), name=str(i))(hidden, mask)
        return hidden, None


def layer_stack(layer_cls, num_layers: int, layer_kwargs: dict, *, name: str,
                scan: bool = False, remat: str = "none"):
    """`num_layers` copies of `layer_cls`, as a module named `name` of the calling module.

    Layers take `(hidden, mask)` and return `(hidden, None)`, the carry/output pair nn.scan needs.
    Unrolled, parameters are `<name>/0/...`, `<name>/1/...` as in HF checkpoints. With `scan=True`
    one layer is traced and compiled once and its parameters carry a leading layer axis
    (`<name>/...`); `models.scan_convert` moves between the two layouts, which is how a scanned
    tower loads and saves HF checkpoints. `remat` recomputes each layer's activations in the
    backward pass by the named policy (REMAT_POLICIES), trading compute for memory.
    Call it inside the parent's compact method.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    layer = layer_cls
    if remat != "none":
        layer = nn.remat(layer, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=nn.broadcast, length=num_layers)
        return scanned(**layer_kwargs, name=name)
    return _Unrolled(layer, num_layers, tuple(layer_kwargs.items()), name=name)


class Encoder(nn.Module):
    """The tower's layer stack under HF's `encoder/` scope; `layers_name` is "layer" (BERT, ViT)
    or "layers" (CLIP)."""

    layer_cls: Any
    layers_name: str
    config: Any

    @nn.compact
    def __call__(self, hidden, mask):
        cfg = self.config
        stack = layer_stack(self.layer_cls, cfg.num_hidden_layers, {"config": cfg},
                            name=self.layers_name, scan=cfg.scan_layers, remat=cfg.remat)
        return stack(hidden, mask)[0]


def dense(config, features: int, name: str) -> nn.Dense:
    """A Dense in the tower's compute dtype with HF's N(0, initializer_range) init."""
    return nn.Dense(features, dtype=config.compute_dtype, name=name,
                    kernel_init=nn.initializers.normal(config.initializer_range))


def layer_norm(config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(config.layer_norm_eps, dtype=config.compute_dtype, name=name)


def deep_adapter(layer_cls, config, hidden, mask):
    """LiLT's deep adapter: `config.deep_layers` fresh layers of the tower's own kind on top of
    its encoder, as `deep_adapter/<i>/...`. Call inside the tower's compact method."""
    if not config.deep_layers:
        return hidden
    return layer_stack(layer_cls, config.deep_layers, {"config": config},
                       name="deep_adapter")(hidden, mask)[0]


# --------------------------------------------------------------------------------------------
# Position embeddings at another resolution
# --------------------------------------------------------------------------------------------

def _bicubic_weights(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """(out, in) matrix of PyTorch's bicubic resize (align_corners=False, no antialias, A=-0.75).

    HF's ViT and CLIP interpolate position embeddings with torch.nn.functional.interpolate in
    this mode; matching it keeps a 224-px checkpoint run at 256 px equal to HF's
    `interpolate_pos_encoding=True`. jax.image.resize uses A=-0.5, which would not match.
    """
    def cubic(t):  # Keys' cubic convolution kernel
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0

    weights = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5  # cubic mode: negative sources are not clamped to 0
        base = math.floor(src)
        frac = src - base
        for tap in range(-1, 3):
            index = min(max(base + tap, 0), in_size - 1)  # border replicate
            weights[o, index] += cubic(tap - frac)
    return weights


def interpolate_patch_positions(pos: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Resize (N, D) patch position embeddings laid out on a square grid to `grid` = (h, w)."""
    n, dim = pos.shape
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"cannot interpolate {n} patch positions: not a square grid")
    if (side, side) == tuple(grid):
        return pos
    wh = jnp.asarray(_bicubic_weights(side, grid[0]), jnp.float32)
    ww = jnp.asarray(_bicubic_weights(side, grid[1]), jnp.float32)
    table = pos.astype(jnp.float32).reshape(side, side, dim)
    hp = jax.lax.Precision.HIGHEST
    out = jnp.einsum("yi,xj,ijd->yxd", wh, ww, table, precision=hp)
    return out.reshape(grid[0] * grid[1], dim).astype(pos.dtype)


# --------------------------------------------------------------------------------------------
# Vision transformers' inputs: patches and positions
# --------------------------------------------------------------------------------------------

def normal_init(config):
    """HF's N(0, initializer_range) weight init."""
    return nn.initializers.normal(config.initializer_range)


def patchify(config, pixel_values, use_bias: bool, name: str):
    """(B, H, W, C) -> (B, H/p * W/p, D) patch tokens and the (H/p, W/p) grid."""
    _, height, width, channels = pixel_values.shape
    p = config.patch_size
    if channels != config.num_channels or height % p or width % p:
        raise ValueError(f"pixel_values of shape {pixel_values.shape} (NHWC) do not fit this tower: "
                         f"expected {config.num_channels} channels and sides divisible by "
                         f"patch_size={p}")
    conv = nn.Conv(config.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=use_bias,
                   dtype=config.compute_dtype, kernel_init=normal_init(config), name=name)
    patches = conv(pixel_values.astype(config.compute_dtype))
    return patches.reshape(patches.shape[0], -1, config.hidden_size), (height // p, width // p)


def add_positions(tokens, table, grid):
    """tokens (B, 1 + h*w, D) + the (1 + N, D) position table, patch part resized to `grid`."""
    positions = jnp.concatenate([table[:1], interpolate_patch_positions(table[1:], grid)], axis=0)
    return tokens + positions[None].astype(tokens.dtype)
