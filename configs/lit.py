"""LiT (Zhai et al., 2022), "locked-image text tuning": a pretrained image tower stays frozen,
the text tower and both projections learn to match it with the softmax contrastive loss.

    python -m valign_jax.main --config=configs/lit.py:demo --workdir=/tmp/lit_demo

Variants:
  pretrained_text   ViT-B/16 (ImageNet-21k) locked + BERT-base, pretrained, trained (default)
  scratch_text      the same image tower; the text tower starts from random weights
The demo locks a randomly initialised tiny image tower (no pretrained one exists offline):
the text side still learns to read what those random features encode.
"""

from valign_jax import recipes

VARIANTS = ("pretrained_text", "scratch_text")


def get_config(arg=None):
    variant, modifiers = recipes.parse_arg(arg, VARIANTS, "pretrained_text", "configs/lit.py")
    c = recipes.base_config()
    c.variant = variant
    c.model.image = recipes.tower("vit_b16", "google/vit-base-patch16-224-in21k", pooling="cls")
    c.model.text = recipes.tower(
        "bert_base", "bert-base-uncased" if variant == "pretrained_text" else "",
        pooling="cls", max_length=64)
    c.model.projection_dim = 768
    c.model.logit_preset = "clip"
    c.peft.recipe = "lit"
    c.data.train, c.data.eval = "tfds:coco_captions/train", "tfds:coco_captions/test"
    c.data.lower_case = True
    c.batch_size, c.num_epochs = 512, 20
    c.optim.update(name="adamw", lr=1e-3, warmup_init_lr=0.0, end_lr=0.0, warmup_steps=1000,
                   b1=0.9, b2=0.95, weight_decay=1e-4)
    if "demo" in modifiers:
        recipes.demo_towers(c, "vit_tiny", "bert_tiny", image_pooling="cls", text_pooling="cls")
        recipes.demo(c, steps=500, lr=2e-3)
    return c
