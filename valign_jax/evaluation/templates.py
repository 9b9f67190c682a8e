"""Zero-shot prompt templates: which sentences a class name is written into.

- `single`: LiLT's protocol (its §6.5): one prompt, "a photo of {}", for every dataset except
  SVHN, which gets "a photo of the number {}".
- `clip80`: the 80-prompt ImageNet ensemble of OpenAI's CLIP; a class's embedding averages them.
- `clip7`: the 7 of those 80 that OpenAI's CLIP notebook selected as the best ensemble.
- `auto` (the config default): `single` for SVHN, the embedded data's own templates for
  `synthetic:` sources, `clip80` otherwise.
"""

from __future__ import annotations

SINGLE = ("a photo of {}",)
SVHN = ("a photo of the number {}",)

CLIP80 = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "the plushie {}.", "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)

CLIP7 = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.",
         "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
         "a photo of the small {}.")

TEMPLATE_SETS = {"single": SINGLE, "clip80": CLIP80, "clip7": CLIP7}


def templates_for(setting, dataset: str, key: str = "config.eval.templates") -> tuple[str, ...]:
    """The templates for `dataset` (a source config string) under `setting`: a set name, "auto",
    or a sequence of templates each holding one '{}'."""
    if isinstance(setting, str):
        if setting == "auto":
            if dataset.startswith("synthetic:"):
                from valign_jax.data import synthetic
                return tuple(synthetic.ZEROSHOT_TEMPLATES)
            setting = "single" if "svhn" in dataset.lower() else "clip80"
        if setting == "single" and "svhn" in dataset.lower():
            return SVHN
        if setting not in TEMPLATE_SETS:
            raise ValueError(f"{key}={setting!r}: not a template set; use 'auto', one of "
                             f"{sorted(TEMPLATE_SETS)}, or a list of templates with '{{}}'")
        return TEMPLATE_SETS[setting]
    templates = tuple(setting)
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"{key}: each template needs exactly one '{{}}' for the class name; "
                         f"got {list(templates)[:5]}")
    return templates
