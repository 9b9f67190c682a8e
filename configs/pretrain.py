"""Unimodal pretraining of the tiny towers that the papers' miniature aligns (papers/run.py):
the offline stand-ins for LiLT's DeiT and SimCSE and SAIL's DINOv2 and GTE, which no
installable package ships. Both stages train on the embedded shapes, one tower each, through
the same loop as every recipe (docs/methods.md §11).

    python -m valign_jax.main --config=configs/pretrain.py:image --workdir=/tmp/pre_image
    python -m valign_jax.main --config=configs/pretrain.py:text --workdir=/tmp/pre_text

Variants:
  image  the image tower as a classifier of the shapes' 24 (colour, shape) classes: its head is
         the linear classifier (projection_dim = 24), the loss cross-entropy on each image's
         label. Held-out accuracy: `heldout/accuracy` in metrics.jsonl.
  text   the text tower as a masked language model of the captions (15% of the tokens, BERT's
         80/10/10 corruption, the decoder tied to its word embeddings). `heldout/mlm_accuracy`.
Each trains its tower (and the image classifier) only: the other tower, the other head and the
logit scale stay frozen and untouched. `python -m papers.run pretrain` runs both stages and
exports the towers as Hugging Face directories (config.json, weights; the text tower with its
tokenizer), which `configs/lilt.py:<row>,demo,pretrained` and `configs/sail.py:demo,pretrained`
start from. The towers are four layers deep, so the LN-shift analysis (LiLT Fig. 4) has a
per-layer series to correlate with depth.

The classes name only colour and shape: the image tower learns what a colour-and-shape
classifier needs, not the count, size and position the captions also describe, as an ImageNet
classifier does not know everything COCO captions say.
"""

from valign_jax import recipes

IMAGE_TOWER, TEXT_TOWER = "vit_tiny_l4", "bert_tiny_l4"
NUM_CLASSES = 24  # synthetic.CLASS_NAMES: 6 colours x 4 shapes
VARIANTS = ("image", "text")


def get_config(arg=None):
    variant, _ = recipes.parse_arg(arg, VARIANTS, "image", "configs/pretrain.py", modifiers=())
    c = recipes.base_config()
    c.variant = variant
    # The towers the miniature's LiLT and SAIL rows load: [CLS] pooling, as LiLT's.
    recipes.demo_towers(c, IMAGE_TOWER, TEXT_TOWER, projection_dim=NUM_CLASSES,
                       image_pooling="cls", text_pooling="cls")
    # Held-out accuracy levels off by these steps: the classifier's at 99% (94% at 400), the
    # masked language model's at 62% (the colour, size, ... of a masked word is not in its
    # context; the grammar is).
    recipes.demo(c, steps=600 if variant == "image" else 400, batch_size=128, lr=2e-3)
    c.model.image_head = c.model.text_head = "linear"
    c.model.head_bias = True  # the classifier's bias
    c.evals = {"heldout": recipes.eval_entry("objective")}
    c.eval_every = c.checkpoint_every = 200
    frozen = ["^logit_scale$", "^text_projection/"]
    if variant == "image":
        c.objective.kind = "classification"
        c.peft.recipe = "lit_reversed"   # the image tower and the heads; the text tower locked
    else:
        c.objective.kind = "masked_lm"
        c.peft.recipe = "lit"            # the text tower and the heads; the image tower locked
        frozen.append("^visual_projection/")  # the decoder is tied: no head trains
    c.peft.overrides = tuple(f"{regex}=frozen" for regex in frozen)
    return c
