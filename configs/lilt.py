"""LiLT (Khan & Fu, ICLR 2023): parameter-efficient alignment of a frozen ViT-B/16 (DeiT weights,
256 px) and BERT-base (SimCSE weights) — every row of the paper's Table 1 as a variant.

    python -m valign_jax.main --config=configs/lilt.py:lilt_lwa --dry_run

Table 1 "% Trained" (of all parameters, inserted adapters included) per variant:
frozen 0.00, ln_only 0.04, projection 0.20, lilt_ln 0.24, lilt_bitfit 0.31, lilt_da_noln 6.96,
lilt_da 6.99, lilt_lwa_noln 6.97, lilt_lwa 7.01, lilt_lwa_bitfit 7.09, lilt_da_bitfit 7.06,
lit 56.01, lit_lwa 57.57, clip 100. Table 3: lilt_da 14.65M, lilt_lwa 14.67M, lit 109.28M,
clip 195.13M trainable. Projections are bias-free Linear(768 -> 256): Table 3's counts need it.

Modifiers: `demo` (random tiny towers, embedded data, offline); `demo,pretrained` starts from
the tiny towers configs/pretrain.py pretrains (a shapes classifier and a caption masked-language
model, exported by `python -m papers.run pretrain`), as the paper starts from DeiT and SimCSE:
`python -m papers.run lilt` runs every row so and tabulates them beside Table 1.
"""

from valign_jax import recipes

# variant: (peft recipe, adapters in (image, text) towers, deep-adapter layers in (image, text))
ADAPTER = 192  # bottleneck = hidden / 4 for base towers
VARIANTS = {
    "frozen": ("frozen", (0, 0), (0, 0)),
    "ln_only": ("ln_only", (0, 0), (0, 0)),
    "projection": ("projection", (0, 0), (0, 0)),
    "lilt_ln": ("lilt_ln", (0, 0), (0, 0)),
    "lilt_bitfit": ("lilt_bitfit", (0, 0), (0, 0)),
    "lilt_da_noln": ("lilt_da_noln", (0, 0), (1, 1)),
    "lilt_da": ("lilt_da", (0, 0), (1, 1)),
    "lilt_lwa_noln": ("lilt_lwa_noln", (ADAPTER, ADAPTER), (0, 0)),
    "lilt_lwa": ("lilt_lwa", (ADAPTER, ADAPTER), (0, 0)),
    "lilt_lwa_bitfit": ("lilt_lwa_bitfit", (ADAPTER, ADAPTER), (0, 0)),
    "lilt_da_bitfit": ("lilt_da_bitfit", (0, 0), (1, 1)),
    "lit": ("lit", (0, 0), (0, 0)),
    "lit_reversed": ("lit_reversed", (0, 0), (0, 0)),
    "lit_da": ("lit_da", (0, 0), (1, 0)),
    "lit_lwa": ("lit_lwa", (ADAPTER, 0), (0, 0)),
    "clip": ("full", (0, 0), (0, 0)),
}


def get_config(arg=None):
    variant, modifiers = recipes.parse_arg(arg, VARIANTS, "lilt_lwa", "configs/lilt.py",
                                          modifiers=("demo", "pretrained"))
    recipe, adapters, deep = VARIANTS[variant]
    c = recipes.base_config()
    c.variant = variant
    c.model.image = recipes.tower("vit_b16", "facebook/deit-base-patch16-224", image_size=256,
                                 pooling="cls")
    c.model.text = recipes.tower("bert_base", "princeton-nlp/unsup-simcse-bert-base-uncased",
                                pooling="cls", max_length=64)
    c.model.projection_dim = 256
    c.model.logit_preset = "lilt"
    c.peft.recipe = recipe
    (c.model.image.adapter_dim, c.model.text.adapter_dim) = adapters
    (c.model.image.deep_layers, c.model.text.deep_layers) = deep
    # COCO, 15 epochs of batch 512 (LiLT §4)
    c.data.train, c.data.eval = "tfds:coco_captions/train", "tfds:coco_captions/test"
    c.batch_size, c.num_epochs = 512, 15
    c.eval.templates = "single"  # LiLT §6.5: "a photo of {}" ("... the number {}" for SVHN)
    c.optim.update(name="adamw", lr=1e-4, warmup_init_lr=1e-5, end_lr=1e-5, warmup_steps=1000,
                   weight_decay=0.02)
    if "demo" in modifiers:
        recipes.demo_towers(c, "vit_tiny", "bert_tiny", image_pooling="cls",
                           image_adapter_dim=adapters[0] and 16, image_deep_layers=deep[0],
                           text_pooling="cls", text_adapter_dim=adapters[1] and 16,
                           text_deep_layers=deep[1])
        recipes.demo(c, steps=1000, lr=3e-3)
    if "pretrained" in modifiers:
        if "demo" not in modifiers:
            raise ValueError("configs/lilt.py: `pretrained` replaces the demo's random tiny "
                             "towers with pretrained ones; use it with `demo` (e.g. "
                             "lilt_lwa,demo,pretrained)")
        recipes.pretrained_demo_towers(c)
        # Half the random towers' steps, the same rate: the sixteen rows of `python -m
        # papers.run lilt` take about 20 minutes on 2 CPU cores.
        recipes.demo(c, steps=500, lr=3e-3)
    return c
