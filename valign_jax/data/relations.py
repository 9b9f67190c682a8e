"""`synthetic:relations`: three shapes in a row, captioned with which colour goes with which
shape — the compositional data the fusion re-ranker is judged on.

    source = SyntheticRelations("eval", num_examples=512, image_size=48)
    source[0]["caption"]   # "a red square left of a blue circle left of a green cross"
    source[1]["caption"]   # "a blue square left of a red circle left of a green cross"

An eval example and its twin hold the same bag of words; only the binding of colour to shape
differs, which a pooled dual-encoder vector struggles to keep and a cross-attention head can
check. In the eval split examples come in such twin pairs (2k and 2k + 1: two objects' colours
swapped), so a model blind to binding scores about 0.5 text→image R@1.

Why three objects: with two, a training batch often holds a scene's swapped twin (there are
few scenes), so the contrastive loss alone teaches the dual encoder the bindings. With three
there are 2,880 scenes and a random batch rarely holds a scene next to one that differs only
by binding — the regime of web data, where dual encoders end up near bags of words — while
the matching loss draws exactly such hard negatives for the fusion head.

Eval scenes are held out: training never shows them nor any other arrangement of the same
colours on the same shape sequence, only their colour-shape bindings in other scenes. Each
example has two captions naming the same scene ("... left of ..." and "... right of ...");
retrieval counts any image with the same scene as a hit. Drawn from
np.random.default_rng([seed, split, i]): reproducible, random access, offline; the words are
all in synthetic.VOCABULARY.

The same held-out scenes also make offline compositional sets (data/compositional.py), drawn
from their own stream so they do not depend on any split's size:

    relation_groups(64, image_size=48)    # Winoground form: a scene and its swapped twin, each
                                          # with its caption; the two images share background,
                                          # shapes and places, only the colours trade places
    relation_choices(64, image_size=48)   # choice form: each of those 128 images, its caption
                                          # and 4 negatives, its three colour swaps and its
                                          # mirror ("a green cross left of ... a red square")
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np

from valign_jax.data.compositional import ChoiceSet, GroupSet
from valign_jax.data.synthetic import COLOUR_RGB, SPLITS, SyntheticSource, _grid, _shape_mask

COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "cross")
OBJECTS = 3  # per scene, left to right

Scene = tuple[tuple[str, str], ...]  # ((colour, shape), ...) from left to right


def held_out(scene: Scene) -> bool:
    """One group in five is never trained on. A group is a shape sequence with a set of
    colours: all arrangements of those colours on those shapes (a scene and its twins) share
    the decision."""
    colours = ",".join(sorted(c for c, _ in scene))
    shapes = ",".join(s for _, s in scene)
    return zlib.crc32(f"{colours}|{shapes}".encode()) % 5 == 0


ALL_SCENES = [tuple(zip(colours, shapes))
              for colours in itertools.permutations(COLOURS, OBJECTS)
              for shapes in itertools.permutations(SHAPES, OBJECTS)]
TRAIN_SCENES = [s for s in ALL_SCENES if not held_out(s)]
EVAL_SCENES = [s for s in ALL_SCENES if held_out(s)]


def captions(scene: Scene) -> tuple[str, str]:
    """Left to right and right to left."""
    named = [f"a {colour} {shape}" for colour, shape in scene]
    return " left of ".join(named), " right of ".join(reversed(named))


def swapped(scene: Scene, i: int, j: int) -> Scene:
    """The same shapes and places with the colours of objects i and j exchanged."""
    colours = [c for c, _ in scene]
    colours[i], colours[j] = colours[j], colours[i]
    return tuple((c, s) for c, (_, s) in zip(colours, scene))


def mirrored(scene: Scene) -> Scene:
    """The scene seen in a mirror: the same objects from right to left."""
    return tuple(reversed(scene))


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Equal-sized shapes, one per column of the image, on a dark noisy background."""
    yy, xx = _grid(image_size)
    base = rng.uniform(8.0, 40.0, size=3).astype(np.float32)
    image = base + rng.normal(0.0, 6.0, size=(image_size, image_size, 3)).astype(np.float32)
    column = 1.0 / len(scene)
    r = 0.36 * column * rng.uniform(0.92, 1.08)
    for k, (colour, shape) in enumerate(scene):
        cx = (k + 0.5) * column + rng.uniform(-0.06, 0.06) * column
        cy = 0.5 + rng.uniform(-0.15, 0.15)
        mask = _shape_mask(shape, yy - np.float32(cy), xx - np.float32(cx), r)
        image[mask] = np.asarray(COLOUR_RGB[colour], np.float32) + rng.uniform(-12, 12, size=3)
    return np.clip(image, 0, 255).astype(np.uint8)


class SyntheticRelations(SyntheticSource):
    """Random-access three-shape scenes (a grain MapDataset source): len() and [index]."""

    def scene(self, index: int) -> Scene:
        """Colours and shapes of example `index` (eval: odd indices are their even neighbour
        with two objects' colours swapped)."""
        if self.split != "eval":
            rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
            return TRAIN_SCENES[rng.integers(len(TRAIN_SCENES))]
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index // 2])
        scene = EVAL_SCENES[rng.integers(len(EVAL_SCENES))]
        i, j = rng.choice(OBJECTS, size=2, replace=False)
        return swapped(scene, i, j) if index % 2 else scene

    def __getitem__(self, index) -> dict:
        index = self._check(index)
        scene = self.scene(index)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index, 1])
        texts = captions(scene)
        return {"image": render(scene, self.image_size, rng), "caption": texts[0],
                "captions": texts}


# ---------------------------------------------------------------------------------------------
# Compositional sets

NEGATIVE_KINDS = ("swap", "mirror")
_COMPOSITIONAL_STREAM = 2   # tells these draws apart from SyntheticRelations' in the eval split


class RelationTwins:
    """Images 2g and 2g + 1: held-out scene g and its twin with two objects' colours swapped,
    drawn with one generator, so background, shapes, places, sizes and noise are identical and
    only the colours differ. len() and [i] -> uint8 (image_size, image_size, 3); `.scene(i)`."""

    def __init__(self, num_groups: int, image_size: int = 32, seed: int = 0):
        if not 1 <= num_groups <= len(EVAL_SCENES):
            raise ValueError(f"num_groups={num_groups}: expected 1 to {len(EVAL_SCENES)} (the "
                             f"held-out scenes)")
        if image_size < 16:
            raise ValueError(f"image_size={image_size}: need at least 16 pixels to draw the shapes")
        self.image_size, self.seed = int(image_size), int(seed)
        rng = np.random.default_rng([self.seed, SPLITS["eval"], _COMPOSITIONAL_STREAM])
        self.scenes: list[Scene] = []
        for k in rng.permutation(len(EVAL_SCENES))[:num_groups]:
            i, j = rng.choice(OBJECTS, size=2, replace=False)
            self.scenes += [EVAL_SCENES[k], swapped(EVAL_SCENES[k], i, j)]

    def __len__(self) -> int:
        return len(self.scenes)

    def scene(self, index: int) -> Scene:
        return self.scenes[index]

    def __getitem__(self, index) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self.scenes):
            raise IndexError(f"index {index} out of range for {len(self.scenes)} images")
        rng = np.random.default_rng([self.seed, SPLITS["eval"], _COMPOSITIONAL_STREAM,
                                     index // 2])
        return render(self.scenes[index], self.image_size, rng)

    def describe(self, index) -> str:
        return f"synthetic:relations twin image {index}"


def negative_scenes(scene: Scene, kinds=NEGATIVE_KINDS) -> list[Scene]:
    """The scenes whose captions are the negatives of `scene`'s: "swap" its three colour swaps
    (same words, other bindings), "mirror" its mirror image (same words, other order)."""
    unknown = set(kinds) - set(NEGATIVE_KINDS)
    if unknown or not kinds:
        raise ValueError(f"negative kinds {tuple(kinds)}: expected a non-empty subset of "
                         f"{NEGATIVE_KINDS}")
    out = []
    if "swap" in kinds:
        out += [swapped(scene, i, j) for i, j in itertools.combinations(range(OBJECTS), 2)]
    if "mirror" in kinds:
        out.append(mirrored(scene))
    return out


def relation_choices(num_groups: int = 64, image_size: int = 32, seed: int = 0,
                     negatives=NEGATIVE_KINDS, name: str = "relations") -> ChoiceSet:
    """Choice form over the 2 * num_groups images of RelationTwins: each image's left-to-right
    caption against those of its negative scenes (`negative_scenes(scene, negatives)`)."""
    images = RelationTwins(num_groups, image_size, seed)
    texts: dict[str, int] = {}
    positive, negs = [], []
    for index in range(len(images)):
        scene = images.scene(index)
        positive.append(texts.setdefault(captions(scene)[0], len(texts)))
        negs.append(np.array([texts.setdefault(captions(s)[0], len(texts))
                              for s in negative_scenes(scene, negatives)], np.int64))
    return ChoiceSet(name, images, tuple(texts), np.arange(len(images), dtype=np.int64),
                     np.array(positive, np.int64), tuple(negs))


def relation_groups(num_groups: int = 64, image_size: int = 32, seed: int = 0,
                    name: str = "relations") -> GroupSet:
    """Winoground form: group g is images (2g, 2g + 1) of RelationTwins with their
    left-to-right captions."""
    images = RelationTwins(num_groups, image_size, seed)
    texts = tuple(captions(images.scene(i))[0] for i in range(len(images)))
    pairs = np.arange(len(images), dtype=np.int64).reshape(-1, 2)
    return GroupSet(name, images, texts, pairs, pairs.copy())
