"""Cross-modal interaction layers: the second stage on top of a dual encoder (docs/methods.md §6).

The dual encoder stays the fast path: one vector per image and per caption, retrieval by dot
product. What a pooled vector cannot keep is *which* attribute goes with which object ("a red
square left of a blue circle" and "a blue square left of a red circle" hold the same words).
Here the text tokens look at the image tokens:

    text_in(text tokens), image_in(image tokens) -> fusion width
    N x [ self-attention over the text (padding masked)
          cross-attention: text queries, image keys/values
          MLP ]                                   (pre-LayerNorm residual blocks)
    -> LayerNorm -> mean over the real text tokens -> `itm`: one image–text-match logit

Both towers' last hidden states feed it, whatever their family (ViT/DeiT/DINOv2/CLIP-vision
tokens, BERT/CLIP-text tokens): the input projections bring them to one width. A padded text
token is never a key and never pooled, so it changes nothing. Used to re-rank the dual
encoder's top-k (evaluation/rerank.py), trained with image–text matching on in-batch hard
negatives (losses.sample_hard_negatives, losses.itm).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from valign_jax.models.layers import dot_product_attention, masked_mean, padding_mask


class Attention(nn.Module):
    """Multi-head attention of `queries` over `keys_values`; mask over the keys."""
    num_heads: int

    @nn.compact
    def __call__(self, queries, keys_values, key_mask=None):
        width = queries.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"fusion width {width} is not divisible by "
                             f"fusion_heads={self.num_heads}")

        def heads(x, name):
            x = nn.Dense(width, name=name)(x)
            return x.reshape(x.shape[:-1] + (self.num_heads, width // self.num_heads))
        mask = None if key_mask is None else padding_mask(key_mask)
        out = dot_product_attention(heads(queries, "query"), heads(keys_values, "key"),
                                    heads(keys_values, "value"), mask)
        return nn.Dense(width, name="out")(out.reshape(out.shape[:2] + (width,)))


class FusionLayer(nn.Module):
    num_heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, text, image, text_mask, image_mask=None):
        h = nn.LayerNorm(name="self_attention_norm")(text)
        text = text + Attention(self.num_heads, name="self_attention")(h, h, text_mask)
        h = nn.LayerNorm(name="cross_attention_norm")(text)
        text = text + Attention(self.num_heads, name="cross_attention")(h, image, image_mask)
        h = nn.LayerNorm(name="mlp_norm")(text)
        h = nn.gelu(nn.Dense(self.mlp_ratio * text.shape[-1], name="mlp_in")(h))
        return text + nn.Dense(text.shape[-1], name="mlp_out")(h)


class FusionHead(nn.Module):
    """(image tokens (B, Li, Di), text tokens (B, Lt, Dt), text mask (B, Lt)) -> (B,) match
    logits."""
    num_layers: int
    num_heads: int = 4
    width: int = 0          # 0: the text tower's width

    @nn.compact
    def __call__(self, image_tokens, text_tokens, text_mask, image_mask=None):
        if image_tokens.ndim != 3 or text_tokens.ndim != 3:
            raise ValueError(f"the fusion head needs token sequences (B, L, D), got image "
                             f"{image_tokens.shape} and text {text_tokens.shape}; towers that "
                             f"give one feature per example (cached features) have no tokens")
        width = self.width or text_tokens.shape[-1]
        text = nn.Dense(width, name="text_in")(text_tokens)
        image = nn.LayerNorm(name="image_norm")(nn.Dense(width, name="image_in")(image_tokens))
        for i in range(self.num_layers):
            text = FusionLayer(self.num_heads, name=f"layer_{i}")(text, image, text_mask,
                                                                  image_mask)
        pooled = masked_mean(nn.LayerNorm(name="final_norm")(text), text_mask)
        return nn.Dense(1, name="itm")(pooled)[:, 0].astype(jnp.float32)

