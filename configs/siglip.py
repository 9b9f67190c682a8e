"""SigLIP (Zhai et al., 2023): the pairwise sigmoid loss with a learnable scale and bias
(t' = log 10, b = -10; sum over the B×B pairs / B), both towers trained (docs/methods.md §2).

    python -m valign_jax.main --config=configs/siglip.py:demo --workdir=/tmp/siglip_demo

Variants:
  b16        ViT-B/16 + the CLIP text transformer, randomly initialised (default)
  chunked    the same with the ring-chunked loss (large batches: no device holds all B×B logits)
"""

from valign_jax import recipes

VARIANTS = ("b16", "chunked")


def get_config(arg=None):
    variant, modifiers = recipes.parse_arg(arg, VARIANTS, "b16", "configs/siglip.py")
    c = recipes.base_config()
    c.variant = variant
    c.model.image = recipes.tower("clip_b16_vision")
    c.model.text = recipes.tower("clip_b32_text", max_length=64)
    c.model.projection_dim = 768
    c.model.logit_preset = "siglip"
    c.objective.kind = "sigmoid"
    c.objective.norm = "batch"
    c.objective.chunked = variant == "chunked"
    # big_vision's SigLIP schedule: Adam(W) lr 1e-3, beta2 0.95, decay 1e-4, warm-up, cosine.
    c.data.train, c.data.eval = "tfds:coco_captions/train", "tfds:coco_captions/test"
    c.batch_size, c.num_epochs = 512, 32
    c.optim.update(name="adamw", lr=1e-3, warmup_init_lr=0.0, end_lr=0.0, warmup_steps=2000,
                   b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4)
    if "demo" in modifiers:
        recipes.demo_towers(c)
        recipes.demo(c, steps=500, lr=2e-3)
    return c
