"""Optimisers by config: optax chains partitioned by the PEFT label tree.

`optax.multi_transform` gives trainable parameters the configured optimiser and frozen ones
`optax.set_to_zero()`, which keeps no state: frozen parameters cost no optimiser memory and get
no weight decay. Within the trainable set, weight decay applies to kernels and embedding tables
only — never to biases, LayerNorm scales, other 1-D parameters, position/class tokens or the
logit scale.
"""

from __future__ import annotations

import jax
import optax

from valign_jax.peft import FROZEN, TRAINABLE


def decay_mask(params):
    """True where weight decay applies: Dense/Conv kernels and embedding tables."""
    def decays(path, leaf):
        name = getattr(path[-1], "key", getattr(path[-1], "name", str(path[-1])))
        return name in ("kernel", "embedding") and getattr(leaf, "ndim", 0) >= 2
    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up from `warmup_init_lr` to `lr`, then cosine to `end_lr` (LiLT, SAIL).

    The warm-up lasts `warmup_steps`, or `warmup_fraction` of the run when that is set (SAIL).
    """
    steps = optim_cfg.warmup_steps
    if optim_cfg.get("warmup_fraction"):
        steps = round(optim_cfg.warmup_fraction * total_steps)
    warmup = min(steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=optim_cfg.warmup_init_lr, peak_value=optim_cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim_cfg.end_lr)


def make_optimizer(optim_cfg, labels, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate(optim_cfg, total_steps)
    name = optim_cfg.name
    if name == "adamw":
        inner = optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                            weight_decay=optim_cfg.weight_decay, mask=decay_mask)
    elif name == "lion":
        inner = optax.lion(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask)
    elif name == "sgd":
        inner = optax.sgd(schedule, momentum=optim_cfg.b1 or None)
    else:
        raise ValueError(f"config.optim.name={name!r}; expected 'adamw', 'lion' or 'sgd'")
    if optim_cfg.grad_clip_norm:
        inner = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), inner)
    return optax.multi_transform({TRAINABLE: inner, FROZEN: optax.set_to_zero()}, labels)
