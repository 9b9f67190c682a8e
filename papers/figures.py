"""The papers' own figures that the miniature's tables sit beside (quoted, in percent).

LiLT (Khan & Fu, ICLR 2023), Table 1: ViT-B/16 (DeiT) + BERT-base (SimCSE) aligned on COCO;
TR / IR = zero-shot Flickr30k image->text / text->image retrieval, each the mean of R@1, R@5
and R@10; IN-V2 = zero-shot ImageNetV2 top-1 with the prompt "a photo of {}".
SAIL (Zhang et al., 2024), Table 1: alignment layers on frozen DINOv2 + GTE-en-large features,
trained on CC3M; TP = trainable parameters of both layers; INet-1k = zero-shot top-1.
"""

# configs/lilt.py variant: (Table 1 row, name, % trained, TR, IR, IN-V2)
LILT_TABLE_1 = {
    "frozen": ("a", "Frozen", 0.00, 0.8, 1.3, 0.2),
    "ln_only": ("b", "LN Only", 0.04, 24.3, 21.6, 4.3),
    "projection": ("c", "Projection Only", 0.20, 38.7, 31.8, 6.7),
    "lilt_ln": ("d", "LiLT-LN", 0.24, 62.3, 51.74, 12.5),
    "lilt_bitfit": ("e", "LiLT-BF", 0.31, 62.6, 52.1, 12.6),
    "lilt_da_noln": ("f", "LiLT-DA w/o LN", 6.96, 57.5, 47.8, 9.02),
    "lilt_da": ("g", "LiLT-DA", 6.99, 68.6, 58.5, 12.9),
    "lilt_lwa_noln": ("h", "LiLT-LwA w/o LN", 6.97, 74.8, 63.9, 12.0),
    "lilt_lwa": ("i", "LiLT-LwA", 7.01, 75.4, 64.4, 12.2),
    "lilt_lwa_bitfit": ("j", "LiLT-LwA (BitFit)", 7.09, 75.3, 64.4, 12.2),
    "lilt_da_bitfit": ("k", "LiLT-DA (BitFit)", 7.06, 68.7, 58.4, 13.2),
    "lit": ("l", "LiT", 56.01, 66.1, 53.5, 15.0),
    "lit_reversed": ("m", "LiT (reversed)", 43.99, 53.7, 46.22, 8.8),
    "lit_da": ("n", "LiT + LiLT-DA", 65.87, 84.2, 75.2, 13.6),
    "lit_lwa": ("o", "LiT + LiLT-LwA", 57.57, 76.7, 64.9, 13.84),
    "clip": ("p", "CLIP", 100.0, 75.8, 65.8, 12.3),
}

# LiLT Fig. 4: the sign of Pearson's r of each tower's per-layer LayerNorm shift against depth
# (LN-only alignment): the image tower's deepest LayerNorms move most, the text tower's least.
LILT_FIG_4_SIGN = {"image": "+", "text": "-"}

# alignment layer: (trainable parameters of both layers, zero-shot ImageNet-1k top-1)
SAIL_TABLE_1 = {
    "linear": ("3.15M", 39.4),
    "mlp": ("33.57M", 51.2),
    "glu": ("54.6M", 52.4),
}
