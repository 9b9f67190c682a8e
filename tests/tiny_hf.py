"""Tiny transformers configs and Flax checkpoints written inside the tests (Flax layout)."""

import numpy as np
import transformers as tf

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            vocab_size=99)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              image_size=32, patch_size=8)


def bert_config():
    return tf.BertConfig(**TEXT, max_position_embeddings=16)


def vit_config():
    return tf.ViTConfig(**VISION)


def clip_config(eos_token_id=98):
    return tf.CLIPConfig(text_config=dict(**TEXT, max_position_embeddings=16,
                                          eos_token_id=eos_token_id),
                         vision_config=VISION, projection_dim=16)


def text_inputs(seed=0, eos=None, batch=3, length=9):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 90, size=(batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, length - 3:] = 0
    if eos is not None:
        ids[0, -1] = eos
        ids[1, length - 4] = eos
        ids[2, 4] = eos
    return ids, mask


def pixels(seed=0, side=32, batch=2):
    return np.random.RandomState(seed).uniform(-1, 1, (batch, side, side, 3)).astype(np.float32)


def nchw(x):
    return x.transpose(0, 3, 1, 2)
