"""A dual encoder with cross-modal interaction layers (docs/methods.md §6): CLIP's towers and
contrastive loss, plus N layers in which the text tokens attend to the image tokens and an
image–text-matching head, trained on in-batch hard negatives. Retrieval stays the dual
encoder's dot product; the match head re-ranks its top k (`retrieval_reranked/...`).

    python -m valign_jax.main --config=configs/fusion.py:demo --workdir=/tmp/fusion_demo

Variants: `scratch` (CLIP ViT-B/16 + text transformer, from scratch; default) and
`pretrained_towers` (DeiT-B/16 and BERT-base weights). The demo trains tiny towers on
`synthetic:relations`, three shapes whose captions differ from their swapped twin's only in
which colour goes with which shape, and evaluates on swapped pairs: what pooled vectors miss.
"""

from pathlib import Path

from valign_jax import recipes

CLIP_CONFIG = Path(__file__).parent / "clip.py"

VARIANTS = ("scratch", "pretrained_towers")


def get_config(arg=None):
    variant, modifiers = recipes.parse_arg(arg, VARIANTS, "scratch", "configs/fusion.py")
    c = recipes.load_config(f"{CLIP_CONFIG}:{variant}")
    c.model.fusion_layers, c.model.fusion_heads = 2, 8
    c.objective.itm_weight = 1.0
    c.eval.rerank_k = 10
    if "demo" in modifiers:
        # three shapes, one per 16-px column; a 16-d joint space: the pooled vector is the
        # bottleneck a re-ranker exists for (it cannot hold every scene's bindings apart)
        recipes.demo_towers(c, image_image_size=48, projection_dim=16)
        c.model.fusion_heads = 4
        c.objective.itm_negatives = 4  # the head sees 8 hard pairs per example, not 2
        recipes.demo(c, steps=1000, lr=2e-3)
        c.data.train = c.data.eval = "synthetic:relations"
        c.eval.zeroshot = ""
        # the held-out scenes next to their swapped-colour twins, in both compositional forms,
        # scored by cosine and by the re-ranking score
        c.evals.relations = recipes.eval_entry("compositional", data="synthetic:relations")
    return c
