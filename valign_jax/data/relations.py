"""`synthetic:relations`: two shapes side by side, captioned with which colour goes with which
shape — the compositional data the fusion re-ranker is judged on.

    source = SyntheticRelations("eval", num_examples=512, image_size=32)
    source[0]["caption"]   # "a red square left of a blue circle"
    source[1]["caption"]   # "a blue square left of a red circle": the same words, bound apart

Both captions hold the same bag of words; only the binding of colour to shape differs, which a
pooled dual-encoder vector struggles to keep and a cross-attention head can check. In the eval
split examples come in such swapped pairs (2k and 2k + 1), so a model blind to binding scores
about 0.5 text→image R@1, and its scenes are held out: training never shows them (nor their
twins), only their colour-shape bindings in other scenes. The train split draws every example
independently from the other scenes. Each example has
two captions naming the same scene ("... left of ..." and "... right of ..."); retrieval
counts any image with the same scene as a hit. Drawn from np.random.default_rng([seed, split,
i]): reproducible, random access, offline; the words are all in synthetic.VOCABULARY.
"""

from __future__ import annotations

import numpy as np

from valign_jax.data.synthetic import COLOUR_RGB, SPLITS, SyntheticSource, _grid, _shape_mask

COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "cross")


def _all_scenes() -> list[dict]:
    return [{"left": (c1, s1), "right": (c2, s2)} for c1 in COLOURS for s1 in SHAPES
            for c2 in COLOURS for s2 in SHAPES if c1 != c2 and s1 != s2]


def held_out(scene: dict) -> bool:
    """One twin pair in five is never trained on: the eval split tests new compositions of
    colour-shape bindings that training shows in other scenes. Twins (colours swapped) share
    the decision."""
    (c1, s1), (c2, s2) = scene["left"], scene["right"]
    a, b = sorted((COLOURS.index(c1), COLOURS.index(c2)))
    return (7 * a + 3 * b + 5 * SHAPES.index(s1) + SHAPES.index(s2)) % 5 == 0


TRAIN_SCENES = [s for s in _all_scenes() if not held_out(s)]
EVAL_SCENES = [s for s in _all_scenes() if held_out(s) and s["left"][0] < s["right"][0]]


def captions(scene: dict) -> tuple[str, str]:
    (c1, s1), (c2, s2) = scene["left"], scene["right"]
    return f"a {c1} {s1} left of a {c2} {s2}", f"a {c2} {s2} right of a {c1} {s1}"


def swapped(scene: dict) -> dict:
    """The same shapes and places with the colours exchanged."""
    (c1, s1), (c2, s2) = scene["left"], scene["right"]
    return {"left": (c2, s1), "right": (c1, s2)}


def render(scene: dict, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Two shapes of equal size, one in each half, on a dark noisy background."""
    yy, xx = _grid(image_size)
    base = rng.uniform(8.0, 40.0, size=3).astype(np.float32)
    image = base + rng.normal(0.0, 6.0, size=(image_size, image_size, 3)).astype(np.float32)
    r = 0.17 * rng.uniform(0.92, 1.08)
    for (colour, shape), cx in ((scene["left"], 0.26), (scene["right"], 0.74)):
        cy, dx = 0.5 + rng.uniform(-0.1, 0.1), rng.uniform(-0.03, 0.03)
        mask = _shape_mask(shape, yy - np.float32(cy), xx - np.float32(cx + dx), r)
        image[mask] = np.asarray(COLOUR_RGB[colour], np.float32) + rng.uniform(-12, 12, size=3)
    return np.clip(image, 0, 255).astype(np.uint8)


class SyntheticRelations(SyntheticSource):
    """Random-access two-shape scenes (a grain MapDataset source): len() and [index]."""

    def scene(self, index: int) -> dict:
        """Colours and shapes of example `index` (eval: odd indices swap their even twin)."""
        pair = self.split == "eval"
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index // 2 if pair else index])
        scenes = EVAL_SCENES if pair else TRAIN_SCENES
        scene = scenes[rng.integers(len(scenes))]
        return swapped(scene) if pair and index % 2 else scene

    def __getitem__(self, index) -> dict:
        index = self._check(index)
        scene = self.scene(index)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index, 1])
        texts = captions(scene)
        return {"image": render(scene, self.image_size, rng), "caption": texts[0],
                "captions": texts}
