"""CLIP (Radford et al., 2021): both towers and both projections trained with the softmax
contrastive loss and a learnable logit scale capped at 100 (docs/methods.md §1).

    python -m valign_jax.main --config=configs/clip.py:demo --workdir=/tmp/clip_demo

Variants:
  scratch             ViT-B/16 + the CLIP text transformer, randomly initialised (default)
  pretrained_towers   DeiT-B/16 and BERT-base weights, every parameter trained
Modifiers: `demo` (tiny towers, embedded data, offline); `fixed_scale` holds the logit scale at
100, where OpenAI's CLIP ends its training — the CLIP-Refine demo pretrains this way so its
model keeps a modality gap to close (docs/methods.md §3); `micro` computes each step in 4
micro-batches by gradient caching (docs/methods.md §8): the same steps as without it, with a
quarter of the activations in memory at a time.
"""

import math

from valign_jax import recipes

VARIANTS = ("scratch", "pretrained_towers")


def get_config(arg=None):
    variant, modifiers = recipes.parse_arg(arg, VARIANTS, "scratch", "configs/clip.py",
                                          modifiers=("demo", "fixed_scale", "micro"))
    c = recipes.base_config()
    c.variant = variant
    if variant == "scratch":
        c.model.image = recipes.tower("clip_b16_vision")
        c.model.text = recipes.tower("clip_b32_text", max_length=77)
    else:
        c.model.image = recipes.tower("vit_b16", "facebook/deit-base-patch16-224", pooling="cls")
        c.model.text = recipes.tower("bert_base", "bert-base-uncased", pooling="cls",
                                    max_length=64)
    c.model.projection_dim = 512
    c.model.logit_preset = "clip"
    c.peft.recipe = "full"
    # CLIP's optimiser (Radford et al. Table 20): AdamW, beta2 0.98, eps 1e-6, decay 0.2,
    # warm-up then cosine. COCO stands in for the 400M pairs; batch 512 instead of 32,768.
    c.data.train, c.data.eval = "tfds:coco_captions/train", "tfds:coco_captions/test"
    c.batch_size, c.num_epochs = 512, 32
    c.optim.update(name="adamw", lr=5e-4, warmup_init_lr=0.0, end_lr=0.0, warmup_steps=2000,
                   b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2)
    if "demo" in modifiers:
        recipes.demo_towers(c)
        recipes.demo(c, steps=500, lr=2e-3)
    if "micro" in modifiers:
        c.micro_batches = 4
    if "fixed_scale" in modifiers:
        c.model.logit_scale_init = math.log(100.0)
        c.peft.overrides = ("^logit_scale$=frozen",)
    return c
