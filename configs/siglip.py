"""SigLIP (Zhai et al., 2023): the pairwise sigmoid loss with a learnable scale and bias
(t' = log 10, b = -10; sum over the B×B pairs / B), both towers trained (docs/methods.md §2),
and fine-tuning, LiT and LiLT on pretrained SigLIP / SigLIP 2 checkpoints (§7).

    python -m valign_jax.main --config=configs/siglip.py:demo --workdir=/tmp/siglip_demo
    python -m valign_jax.main --config=configs/siglip.py:finetune,demo --workdir=/tmp/siglip_ft

Variants:
  b16        ViT-B/16 + the CLIP text transformer, randomly initialised (default)
  chunked    the same with the ring-chunked loss (large batches: no device holds all B×B logits)
  finetune   a SigLIP checkpoint (google/siglip-base-patch16-224) on your pairs: every weight
             trains, starting from its own logit scale and bias, with the sigmoid loss
  finetune_naflex   the same from a SigLIP 2 NaFlex checkpoint (google/siglip2-base-patch16-
             naflex), fed square 256-px images (its 16×16 position grid); lower-cased text
  lit        LiT on SigLIP towers: the vision tower (its attention-pooling head too) locked,
             the text tower and the scale and bias trained
  lilt       LiLT on SigLIP towers: identity-initialised adapters in every layer of both towers
             (LiLT's LwA), the LayerNorms, the towers' heads and the scale and bias train;
             the rest stays frozen
With `demo`, the checkpoint variants start from a tiny random SigLIP (SigLIP 2 for
finetune_naflex) checkpoint made on the spot (recipes.demo_checkpoint): offline, 32-px images.
Point `config.model.init_from` and both towers' `checkpoint` at another SigLIP directory or hub
id to fine-tune that one; its tokenizer and max length (64) come with it.
"""

from valign_jax import recipes

VARIANTS = ("b16", "chunked", "finetune", "finetune_naflex", "lit", "lilt")
CHECKPOINTS = {"siglip": "google/siglip-base-patch16-224",
               "siglip2": "google/siglip2-base-patch16-naflex"}
PRESETS = {"siglip": ("siglip_b16_vision", "siglip_b16_text"),
           "siglip2": ("siglip2_b16_naflex_vision", "siglip2_b16_text")}


def get_config(arg=None):
    variant, modifiers = recipes.parse_arg(arg, VARIANTS, "b16", "configs/siglip.py")
    c = recipes.base_config()
    c.variant = variant
    c.model.logit_preset = "siglip"
    c.objective.kind = "sigmoid"
    c.objective.norm = "batch"
    c.objective.chunked = variant == "chunked"
    c.data.train, c.data.eval = "tfds:coco_captions/train", "tfds:coco_captions/test"
    if variant in ("b16", "chunked"):
        from_scratch(c, "demo" in modifiers)
    else:
        from_checkpoint(c, variant, "demo" in modifiers)
    return c


def from_scratch(c, demo: bool):
    c.model.image = recipes.tower("clip_b16_vision")
    c.model.text = recipes.tower("clip_b32_text", max_length=64)
    c.model.projection_dim = 768
    # big_vision's SigLIP schedule: Adam(W) lr 1e-3, beta2 0.95, decay 1e-4, warm-up, cosine.
    c.batch_size, c.num_epochs = 512, 32
    c.optim.update(name="adamw", lr=1e-3, warmup_init_lr=0.0, end_lr=0.0, warmup_steps=2000,
                   b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4)
    if demo:
        recipes.demo_towers(c)
        recipes.demo(c, steps=500, lr=2e-3)


def from_checkpoint(c, variant: str, demo: bool):
    """The towers, heads, logit scale and bias of a SigLIP checkpoint (`init_from`), trained as
    the variant says."""
    kind = "siglip2" if variant == "finetune_naflex" else "siglip"
    checkpoint = recipes.demo_checkpoint(kind) if demo else CHECKPOINTS[kind]
    image_preset, text_preset = recipes.DEMO_CHECKPOINTS[kind] if demo else PRESETS[kind]
    text_length = 16 if demo else 64  # the checkpoint's max_position_embeddings
    c.model.image = recipes.tower(image_preset, checkpoint)
    c.model.text = recipes.tower(text_preset, checkpoint, max_length=text_length)
    c.model.init_from = checkpoint
    c.model.image_head = c.model.text_head = "identity"  # SigLIP's heads are in its towers
    c.model.projection_dim = 64 if demo else 768
    c.data.lower_case = kind == "siglip2"  # SigLIP 2 was trained on lower-cased text
    c.batch_size, c.num_epochs = 256, 5
    # Fine-tuning pretrained towers: a small peak rate after a warm-up, cosine to ~0.
    c.optim.update(name="adamw", lr=1e-5, warmup_init_lr=0.0, end_lr=0.0, warmup_steps=500,
                   b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4)
    if variant == "lit":
        c.peft.recipe = "lit"
        c.peft.overrides = ("^vision_model/=frozen",)  # locked: the MAP head too
        c.optim.lr = 1e-4
    elif variant == "lilt":
        c.peft.recipe = "lilt_lwa"
        c.model.adapter_init = "identity"  # the pretrained model's outputs, unchanged at step 0
        c.model.image.adapter_dim = c.model.text.adapter_dim = 16 if demo else 192
        c.optim.lr = 1e-4
    if demo:
        c.model.image.image_size = 32
        recipes.demo(c, steps=300, lr=3e-3 if variant in ("lit", "lilt") else 1e-3)
    elif kind == "siglip2":
        c.model.image.image_size = 256  # square images filling its 16×16 position grid
