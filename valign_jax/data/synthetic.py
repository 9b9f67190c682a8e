"""The embedded image–caption dataset: coloured shapes on a dark, noisy background.

Every recipe's `:demo` trains tiny towers on this data, offline and in a couple of minutes on a CPU,
and must visibly learn, so the data is small in concept and large in supply:

    source = SyntheticImageText("train", num_examples=20_000, image_size=32, seed=0)
    ex = source[7]    # {"image": uint8 (32, 32, 3), "caption": "two large blue squares at the top",
                      #  "captions": (...paraphrases), "long_caption": "...", "label": 9,
                      #  "attributes": {"count": "two", "size": "large", "colour": "blue", ...}}

An example is a few attributes (count, size, colour, shape, position), each one visible at 32x32
and the geometry scaled to any `image_size`. Nothing is read from disk or the network: example `i`
of a split is drawn from `np.random.default_rng([seed, split_id, i])`, so it is fully reproducible,
random access (a grain MapDataset source) and the eval split is a held-out stream. The canonical
`caption` depends on the attributes only (retrieval counts an item with the same caption as a hit);
`captions` are paraphrases for training, `long_caption` a longer description (multi-positive SAIL).
Zero-shot classes are the (colour, shape) pairs, `CLASS_NAMES`, with `ZEROSHOT_TEMPLATES`.

`WordTokenizer` is a word-level tokenizer over `VOCABULARY`, the closed set of words every caption,
class name and template uses, with the call interface of `valign_jax.data.tokenizer.Tokenizer`.
Only NumPy is used here.
"""

from __future__ import annotations

import functools
import itertools
import operator
import re
from typing import Sequence

import numpy as np

from valign_jax.special_tokens import SPECIAL_IDS

COUNTS = ("one", "two")
SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("left", "right", "top", "bottom")
ATTRIBUTES = {"count": COUNTS, "size": SIZES, "colour": COLOURS, "shape": SHAPES,
              "position": POSITIONS}

COLOUR_RGB = {"red": (225, 40, 40), "green": (40, 195, 60), "blue": (45, 95, 245),
              "yellow": (235, 215, 40), "purple": (165, 60, 225), "white": (235, 235, 235)}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

CLASS_NAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.",
                      "there is a {} in the image.", "a drawing of a {}.")

SPLITS = {"train": 0, "eval": 1}

_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom"}
_POSITION_HALF = {"left": "the left half", "right": "the right half", "top": "the top half",
                  "bottom": "the bottom half"}
_POSITION_LONG = {"left": "on the left side of the image",
                  "right": "on the right side of the image",
                  "top": "at the top of the image", "bottom": "at the bottom of the image"}


# ---------------------------------------------------------------------------------------------
# Captions


def _nouns(a: dict) -> tuple[str, str, str, str]:
    """(determiner, noun, 'is'/'are', 'single'/'two') for the count and shape of `a`."""
    if a["count"] == "one":
        return "a", a["shape"], "is", "a single"
    return "two", PLURALS[a["shape"]], "are", "two"


def canonical_caption(a: dict) -> str:
    """'a small red circle on the left', 'two large blue squares at the top': attributes only."""
    det, noun, _, _ = _nouns(a)
    return f"{det} {a['size']} {a['colour']} {noun} {_POSITION_PHRASE[a['position']]}"


def paraphrases(a: dict) -> tuple[str, ...]:
    """The canonical caption first, then other sentences naming exactly the same attributes."""
    det, noun, verb, _ = _nouns(a)
    size, colour, pos = a["size"], a["colour"], _POSITION_PHRASE[a["position"]]
    count = a["count"]
    return (canonical_caption(a),
            f"{pos}, {det} {size} {colour} {noun}",
            f"there {verb} {det} {size} {colour} {noun} {pos}",
            f"{det} {colour} {noun} that {verb} {size}, {pos}",
            f"{count} {size} {colour} {noun} in {_POSITION_HALF[a['position']]} of the image",
            f"a picture of {det} {size} {colour} {noun} {pos}")


def long_caption(a: dict) -> str:
    """A longer description with the same attributes (and a word about the background)."""
    _, noun, verb, many = _nouns(a)
    subject = "the shape" if a["count"] == "one" else "the shapes"
    return (f"a dark, noisy picture showing {many} {a['size']} {a['colour']} {noun} "
            f"{_POSITION_LONG[a['position']]}. {subject} {verb} {a['colour']} and {a['size']}, "
            f"and there {verb} {a['count']} of {'it' if a['count'] == 'one' else 'them'}.")


def class_index(a: dict) -> int:
    """Index into CLASS_NAMES of the (colour, shape) of `a`."""
    return COLOURS.index(a["colour"]) * len(SHAPES) + SHAPES.index(a["shape"])


_WORD = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")


def _split(text: str, lower_case: bool) -> list[str]:
    return _WORD.findall(text.lower() if lower_case else text)


def words(text: str) -> list[str]:
    """The splitter behind VOCABULARY and WordTokenizer: lower-cased runs of letters/digits, and
    every other non-space character (punctuation) as a token of its own."""
    return _split(text, lower_case=True)


def _all_texts():
    for values in itertools.product(*ATTRIBUTES.values()):
        a = dict(zip(ATTRIBUTES, values))
        yield from paraphrases(a)
        yield long_caption(a)
    for name in CLASS_NAMES:
        yield name
        yield from (t.format(name) for t in ZEROSHOT_TEMPLATES)


VOCABULARY = tuple(sorted({w for text in _all_texts() for w in words(text)}))


# ---------------------------------------------------------------------------------------------
# Images


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in units of the image side: (y, x), each (size, size) float32 in (0, 1)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    zeros = np.zeros((size, size), np.float32)
    return c[:, None] + zeros, c[None, :] + zeros


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `shape` with 'radius' r centred at offset (0, 0); all about equally large."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":  # pointing up: apex at -1.05 r, base at +1.05 r, base half-width 1.15 r
        return (dy <= 1.05 * r) & (np.abs(dx) <= (dy + 1.05 * r) * 0.55)
    if shape == "cross":     # a plus sign, arms a third of the radius thick
        ax, ay, w = np.abs(dx), np.abs(dy), 0.34 * r
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(a: dict, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws the attributes `a` as a uint8 (image_size, image_size, 3) image, jitter from `rng`.

    Geometry is in units of the side, so every size looks alike. The object group is centred in
    its half (x or y at 0.25 / 0.75, the other coordinate at 0.5); two objects sit side by side
    along that half's long axis, apart by their radius plus a gap."""
    yy, xx = _grid(image_size)
    base = rng.uniform(8.0, 40.0, size=3).astype(np.float32)
    image = base + rng.normal(0.0, 6.0, size=(image_size, image_size, 3)).astype(np.float32)
    r = (0.18 if a["size"] == "large" else 0.11) * rng.uniform(0.92, 1.08)
    pos = a["position"]
    centre = {"left": (0.5, 0.25), "right": (0.5, 0.75), "top": (0.25, 0.5),
              "bottom": (0.75, 0.5)}[pos]
    cy, cx = np.asarray(centre) + rng.uniform(-0.04, 0.04, size=2)
    if a["count"] == "one":
        centres = [(cy, cx)]
    else:  # left/right halves are tall: stack vertically; top/bottom halves are wide: side by side
        d = r + 0.05
        centres = ([(cy - d, cx), (cy + d, cx)] if pos in ("left", "right")
                   else [(cy, cx - d), (cy, cx + d)])
    mask = np.zeros((image_size, image_size), bool)
    for y, x in centres:
        mask |= _shape_mask(a["shape"], yy - np.float32(y), xx - np.float32(x), r)
    colour = np.asarray(COLOUR_RGB[a["colour"]], np.float32) + rng.uniform(-12, 12, size=3)
    image[mask] += colour - base
    return np.clip(image, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The source


class SyntheticSource:
    """What every embedded dataset shares: split, size, image size, seed; len(), checked
    indices and a repr. Subclasses draw example `i` in __getitem__."""

    def __init__(self, split: str = "train", num_examples: int = 10_000, image_size: int = 32,
                 seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits are {sorted(SPLITS)}")
        if num_examples < 0:
            raise ValueError(f"num_examples={num_examples} must be >= 0")
        if image_size < 16:
            raise ValueError(f"image_size={image_size}: need at least 16 pixels to draw the shapes")
        self.split, self.num_examples = split, int(num_examples)
        self.image_size, self.seed = int(image_size), int(seed)

    def __len__(self) -> int:
        return self.num_examples

    def _check(self, index) -> int:
        index = operator.index(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        return index

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, num_examples={self.num_examples}, "
                f"image_size={self.image_size}, seed={self.seed})")


class SyntheticImageText(SyntheticSource):
    """Random-access image–caption examples (a grain MapDataset source): len() and [index]."""

    def __getitem__(self, index) -> dict:
        index = self._check(index)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        a = {name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}
        return {"image": render(a, self.image_size, rng),
                "caption": canonical_caption(a),
                "captions": paraphrases(a),
                "long_caption": long_caption(a),
                "label": class_index(a),
                "attributes": a}


# ---------------------------------------------------------------------------------------------
# Tokenizer

PAD_ID, BOS_ID, UNK_ID, EOS_ID = (SPECIAL_IDS[k] for k in ("pad", "bos", "unk", "eos"))
_FIRST_WORD_ID = 4


class WordTokenizer:
    """Word-level tokenizer over VOCABULARY, called like data.tokenizer.Tokenizer.

    Each text becomes [BOS, words..., EOS] padded with PAD to `max_length`; a long text is cut so
    that EOS stays its last token. Unknown words map to UNK."""

    def __init__(self, max_length: int, lower_case: bool = True):
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: need room for at least the special tokens")
        self.max_length, self.lower_case = int(max_length), lower_case
        self.ids = {w: i + _FIRST_WORD_ID for i, w in enumerate(VOCABULARY)}

    @property
    def vocab_size(self) -> int:
        return _FIRST_WORD_ID + len(VOCABULARY)

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Token ids back to words, special tokens dropped (UNK shown as '[UNK]')."""
        return [VOCABULARY[i - _FIRST_WORD_ID] if i >= _FIRST_WORD_ID else "[UNK]"
                for i in map(int, ids) if i not in (PAD_ID, BOS_ID, EOS_ID)]

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("WordTokenizer takes a list of strings; wrap a single text in a list")
        input_ids = np.full((len(texts), self.max_length), PAD_ID, np.int32)
        for row, text in enumerate(texts):
            body = [self.ids.get(w, UNK_ID) for w in _split(text, self.lower_case)]
            seq = [BOS_ID] + body[:self.max_length - 2] + [EOS_ID]
            input_ids[row, :len(seq)] = seq
        return {"input_ids": input_ids,
                "attention_mask": (input_ids != PAD_ID).astype(np.int32)}


def save_hf_tokenizer(directory) -> None:
    """Write WordTokenizer as a Hugging Face tokenizer (tokenizer.json + config) into
    `directory`: the same ids for every text, so a demo model exported with hf.save_dual_encoder
    is a complete checkpoint that transformers' AutoTokenizer and our Tokenizer can read."""
    from tokenizers import Regex, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = {"[PAD]": PAD_ID, "[BOS]": BOS_ID, "[UNK]": UNK_ID, "[EOS]": EOS_ID}
    vocab = {**specials, **{w: i + _FIRST_WORD_ID for i, w in enumerate(VOCABULARY)}}
    tok = RustTokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # the pieces _WORD finds, spaces dropped
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(_WORD.pattern), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                            eos_token="[EOS]", unk_token="[UNK]").save_pretrained(str(directory))
