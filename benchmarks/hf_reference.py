"""The reference CLIP train step, assembled from Hugging Face transformers' Flax ViT and BERT
modules (FlaxViTModel's and FlaxBertModel's linen modules) the way a user would write it: both
towers, a bias-free linear projection each, a learnable logit scale, the same softmax
contrastive loss, and optax AdamW over every parameter, with the same decay mask.

It is what `train_step_time_ratio_vs_hf_flax` divides by. Needs transformers with its Flax
models (4.x; transformers 5 dropped Flax); the caller records a skip when it is missing.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks import common
from valign_jax import losses, optim


def hf_configs(model):
    """transformers configs equal to our DualEncoder's ViT and BERT towers, dropout off."""
    from transformers import BertConfig, ViTConfig
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return (ViTConfig(**model.image_config.to_hf(), **no_dropout),
            BertConfig(**model.text_config.to_hf(), **no_dropout))


class HFDualEncoder(nn.Module):
    """FlaxViTModule + FlaxBertModule, [CLS] pooling on each (as our towers' defaults)."""

    vit_config: object
    bert_config: object
    projection_dim: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, input_ids, attention_mask):
        from transformers.models.bert.modeling_flax_bert import FlaxBertModule
        from transformers.models.vit.modeling_flax_vit import FlaxViTModule
        vision = FlaxViTModule(self.vit_config, dtype=self.dtype, add_pooling_layer=False,
                               name="vision_model")(pixel_values, deterministic=True)
        text = FlaxBertModule(self.bert_config, dtype=self.dtype, add_pooling_layer=False,
                              name="text_model")(input_ids, attention_mask, deterministic=True)
        project = lambda name: nn.Dense(self.projection_dim, use_bias=False, name=name)
        image = project("visual_projection")(vision.last_hidden_state[:, 0])
        txt = project("text_projection")(text.last_hidden_state[:, 0])
        scale = self.param("logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), ())
        return image, txt, scale


def reference_step(model: HFDualEncoder, optimizer: optax.GradientTransformation):
    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def step(state, batch):  # state: (params, optimizer state)
        def loss_fn(params):
            image, text, log_scale = model.apply({"params": params}, batch["pixel_values"],
                                                 batch["input_ids"], batch["attention_mask"])
            return losses.softmax_contrastive(unit(image), unit(text), jnp.exp(log_scale))

        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params["logit_scale"] = losses.clamp_log_scale(params["logit_scale"], "clip")
        return (params, opt_state), {"loss": loss}
    return step


def compiled_reference_step(ours, batch, settings):
    """(compiled step, state, extra) of the reference at the sizes of our DualEncoder `ours`."""
    vit_config, bert_config = hf_configs(ours)
    model = HFDualEncoder(vit_config, bert_config, ours.projection_dim,
                          ours.image_config.compute_dtype)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch["pixel_values"][:1],
                            batch["input_ids"][:1], batch["attention_mask"][:1])["params"]
    params = common.random_params(shapes)
    schedule = optim.learning_rate(settings, total_steps=1000)
    optimizer = optax.adamw(schedule, b1=settings.b1, b2=settings.b2, eps=settings.eps,
                            weight_decay=settings.weight_decay, mask=optim.decay_mask)
    state = (params, jax.jit(optimizer.init)(params))
    start = time.perf_counter()
    compiled = jax.jit(reference_step(model, optimizer), donate_argnums=0).lower(
        state, batch).compile()
    count = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return compiled, state, {"compile_s": time.perf_counter() - start,
                             "total_params": int(count)}
