"""CLIP-Refine (Yamaguchi et al., 2025): a short post-pre-training of a pretrained CLIP that
closes its modality gap: RaFA pulls image and text features towards shared random references,
HyCD distils the frozen initial model's similarities mixed with the identity (docs/methods.md §3).

    python -m valign_jax.main --config=configs/clip_refine.py:demo --workdir=/tmp/refine_demo

Official defaults: OpenAI CLIP ViT-B/32, COCO captions (one random caption per image), one epoch,
AdamW lr 1e-6 (constant), weight decay 0.1, batch 512, all parameters trained, fp32,
loss weights (CLIP, RaFA, HyCD) = (0, 1, 1), RaFA in the official code's form.
Variant `paper_rafa` uses the paper text's RaFA (= official × D/2).

The demo first trains a tiny CLIP on the embedded shapes with its logit scale held at 100 (as
OpenAI's CLIP ends), in <workdir>/pretrain; that model keeps a modality gap, which refining
then closes.
"""

from pathlib import Path

from valign_jax import recipes

VARIANTS = ("official", "paper_rafa")
CLIP_CONFIG = str(Path(__file__).parent / "clip.py")


def get_config(arg=None):
    variant, modifiers = recipes.parse_arg(arg, VARIANTS, "official", "configs/clip_refine.py")
    c = recipes.base_config()
    c.variant = variant
    checkpoint = "openai/clip-vit-base-patch32"
    c.model.image = recipes.tower("clip_b32_vision", checkpoint)
    c.model.text = recipes.tower("clip_b32_text", checkpoint, max_length=77)
    c.model.init_from = checkpoint  # projections and logit scale too
    c.model.projection_dim = 512
    c.model.logit_preset = "clip"
    c.peft.recipe = "full"
    c.objective.kind = "clip_refine"
    c.objective.clip_refine.rafa_form = "paper" if variant == "paper_rafa" else "official"
    c.data.train, c.data.eval = "tfds:coco_captions/train", "tfds:coco_captions/test"
    c.batch_size, c.num_epochs = 512, 1
    c.optim.update(name="adamw", lr=1e-6, warmup_init_lr=1e-6, end_lr=1e-6, warmup_steps=0,
                   weight_decay=0.1)
    if "demo" in modifiers:
        recipes.demo_towers(c)
        c.model.init_from = ""
        c.pretrain = CLIP_CONFIG + ":demo,fixed_scale"
        recipes.demo(c, steps=400, lr=3e-5)
        c.optim.update(warmup_init_lr=3e-5, end_lr=3e-5, warmup_steps=0)  # constant, as above
    return c
