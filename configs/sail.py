"""SAIL (Zhang et al., 2024): frozen pretrained towers, a GLU ("star") alignment layer per
modality, the sigmoid loss over all pairs (/B²) with long captions as a second positive, and
Lion (docs/methods.md §4).

    python -m valign_jax.main --config=configs/sail.py:demo --workdir=/tmp/sail_demo

Towers: DINOv2-L (features = concat[CLS, mean of patch tokens], 2048-d) and GTE-large
(mean-pooled, 1024-d); both alignment layers map to 1024. The paper trains on CC3M/CC12M with
long captions: point config.data.train at a pairs.jsonl whose rows carry `long_caption`.
Optimiser: Lion β=(0.9, 0.99), lr 1e-5, weight decay 1e-4 (official code; the paper's text says
1e-7), 10% warm-up then cosine to 0, batch 32,768 (the towers are frozen, so only the
alignment layers hold optimizer state).

Modifiers: `demo` (random tiny towers, embedded data, offline); `demo,pretrained` aligns the
tiny towers configs/pretrain.py pretrains (`python -m papers.run pretrain`). The alignment
layers are config.model.image_head / text_head (glu, mlp or linear): `python -m papers.run sail`
compares the three on the same cached features, as the paper's Table 1 does.
"""

import math

from valign_jax import recipes

VARIANTS = ("dinov2_l_gte_l",)


def get_config(arg=None):
    variant, modifiers = recipes.parse_arg(arg, VARIANTS, "dinov2_l_gte_l", "configs/sail.py",
                                          modifiers=("demo", "pretrained"))
    c = recipes.base_config()
    c.variant = variant
    c.model.image = recipes.tower("dinov2_l14", "facebook/dinov2-large", pooling="cls_mean",
                                 image_size=224)
    c.model.text = recipes.tower("bert_large", "thenlper/gte-large", pooling="mean",
                                max_length=77)
    c.model.projection_dim = 1024
    c.model.image_head = c.model.text_head = "glu"
    c.model.logit_preset = "sail"
    c.peft.recipe = "heads_only"
    c.objective.update(kind="sigmoid", norm="pairs", multi_positive=True)
    # The towers are frozen: their features are computed once into <workdir>/feature_cache
    # (the first run builds it) and training reads only those.
    c.data.feature_cache = "feature_cache"
    # COCO's captions stand in; SAIL's own data (CC3M/CC12M with long captions) is a
    # pairs.jsonl whose rows carry `long_caption`: --config.data.train=PATH/pairs.jsonl
    c.data.train, c.data.eval = "tfds:coco_captions/train", "tfds:coco_captions/test"
    c.batch_size, c.num_epochs = 32_768, 50
    c.optim.update(name="lion", lr=1e-5, warmup_init_lr=0.0, end_lr=0.0, warmup_fraction=0.1,
                   b1=0.9, b2=0.99, weight_decay=1e-4)
    if "demo" in modifiers:
        # Long captions need 35 tokens. The frozen tiny towers are random: the GLU layers learn
        # to align what random features of the shapes happen to encode.
        recipes.demo_towers(c, "vit_tiny", "bert_tiny", image_pooling="cls_mean",
                           text_pooling="mean", text_max_length=40)
        recipes.demo(c, steps=1500, lr=1e-4)  # Lion: sign updates need a small lr
        # b = -10 sits at the all-negatives equilibrium -log(B - 1) for SAIL's B = 32,768.
        # At B = 64 the equilibrium is -4.1; starting at -10, Lion moves b by only lr per
        # step, so the features collapse to raise every logit instead. Start at equilibrium.
        c.model.logit_bias_init = -math.log(c.batch_size - 1)
    if "pretrained" in modifiers:
        if "demo" not in modifiers:
            raise ValueError("configs/sail.py: `pretrained` replaces the demo's random tiny "
                             "towers with pretrained ones; use it with `demo` (demo,pretrained)")
        recipes.pretrained_demo_towers(c)
    return c
