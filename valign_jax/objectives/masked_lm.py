"""Masked-language modelling: self-supervised pretraining of a text tower (BERT's objective;
docs/methods.md §11).

Per caption, each real token other than the first and the last (BOS/[CLS] and EOS/[SEP]) is
chosen with probability `mlm_rate`; of the chosen, 80% become `mask_token_id`, 10% a word drawn
uniformly from the batch's maskable tokens, 10% stay as they are. The tower reads the corrupted
caption and predicts every chosen token from its last hidden state through a decoder tied to
its own word-embedding table (logits = h · Eᵀ), so the objective adds no parameter; the loss
is the cross-entropy over the chosen tokens. It runs the text tower itself through the "model" need;
the model's own forward pass on the clean batch is unused and dropped by the compiler.

Tokenizers made for scratch towers have no [MASK] token: their [UNK] stands in (the embedded
captions never contain an unknown word); a BERT checkpoint's tokenizer has [MASK] = 103.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from valign_jax.objectives.base import Objective, ObjectiveKind, register
from valign_jax.special_tokens import SPECIAL_IDS


def word_embeddings(text_params, vocab_size: int):
    """The text tower's token-embedding table: the one (vocab_size, width) embedding, preferring
    one whose path names words or tokens when several have that shape."""
    flat = traverse_util.flatten_dict(text_params, sep="/")
    tables = [p for p, v in flat.items() if p.endswith("embedding") and v.ndim == 2
              and v.shape[0] == vocab_size]
    named = [p for p in tables if "word" in p or "token" in p]
    chosen = named or tables
    if len(chosen) != 1:
        raise ValueError(f"masked_lm ties its decoder to the text tower's word embeddings, but "
                         f"found {len(chosen)} ({vocab_size}, width) embedding tables in "
                         f"text_model: {chosen}")
    return flat[chosen[0]]


def token_logits(module, input_ids, attention_mask):
    """A DualEncoder method: vocabulary logits of every position of the text tower."""
    hidden = module.text_model(input_ids, attention_mask)["last_hidden_state"]
    table = word_embeddings(module.variables["params"]["text_model"],
                            module.text_config.vocab_size)
    return hidden.astype(jnp.float32) @ table.T


def corrupt(rng, input_ids, attention_mask, rate: float, mask_token_id: int):
    """(corrupted ids, chosen positions): BERT's 80/10/10 corruption of `rate` of the real
    tokens between the first and the last."""
    real = attention_mask > 0
    length = jnp.sum(real, axis=-1, keepdims=True)
    position = jnp.arange(input_ids.shape[-1])[None, :]
    maskable = real & (position > 0) & (position < length - 1)
    choose_rng, kind_rng, donor_rng = jax.random.split(rng, 3)
    chosen = maskable & jax.random.bernoulli(choose_rng, rate, input_ids.shape)
    kind = jax.random.uniform(kind_rng, input_ids.shape)
    # a word of the batch drawn uniformly: the maskable positions sorted first, one of them
    words = jnp.argsort(~maskable.reshape(-1), stable=True)
    pick = jax.random.randint(donor_rng, input_ids.shape, 0, jnp.maximum(jnp.sum(maskable), 1))
    donors = input_ids.reshape(-1)[words[pick]]
    corrupted = jnp.where(kind < 0.8, mask_token_id, jnp.where(kind < 0.9, donors, input_ids))
    return jnp.where(chosen, corrupted, input_ids), chosen


def masked_lm_objective(rate: float = 0.15, mask_token_id: int = SPECIAL_IDS["unk"]) -> Objective:
    def checked_logits(module, input_ids, attention_mask):
        # An id beyond the table would be clamped by the embedding lookup, silently: the
        # vocabulary size is known only here, when the step is traced.
        vocab_size = module.text_config.vocab_size
        if not 0 <= mask_token_id < vocab_size:
            raise ValueError(f"config.objective.mask_token_id={mask_token_id} is not a token of "
                             f"the text tower's vocabulary (size {vocab_size}): set the id of "
                             f"its tokenizer's [MASK] (or [UNK])")
        return token_logits(module, input_ids, attention_mask)

    def loss(out, batch, rng):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        corrupted, chosen = corrupt(rng, ids, mask, rate, mask_token_id)
        logits = out["apply"](checked_logits, corrupted, mask)
        log_probs = jax.nn.log_softmax(logits)
        picked = jnp.take_along_axis(log_probs, ids[..., None], axis=-1)[..., 0]
        count = jnp.maximum(jnp.sum(chosen), 1)
        value = -jnp.sum(jnp.where(chosen, picked, 0.0)) / count
        correct = (jnp.argmax(logits, axis=-1) == ids) & chosen
        return value, {"mlm_accuracy": jnp.sum(correct) / count,
                       "masked_tokens": jnp.sum(chosen).astype(jnp.float32)}
    return Objective(loss, {"model"})


def _check(config) -> list[str]:
    rate = config.objective.get("mlm_rate", 0.15)
    if not 0 < rate < 1:
        return [f"config.objective.mlm_rate={rate!r}: must be in (0, 1)"]
    return []


register(ObjectiveKind(
    name="masked_lm", check=_check,
    build=lambda cfg, mesh: masked_lm_objective(cfg.mlm_rate, cfg.mask_token_id),
    help="masked-language modelling of the text tower (BERT's), decoder tied to its word "
         "embeddings",
    options={"mlm_rate": 0.15, "mask_token_id": SPECIAL_IDS["unk"]}))
