"""Compositional evaluation sets: images with true and false captions, read from JSONL files or
drawn from the embedded data (relations.py), for evaluation/compositional.py to score.

Two JSONL forms, one JSON object a line, image paths relative to the file:

    choice (SugarCrepe, ARO):   {"image": "img/1.jpg", "caption": "a dog on a sofa",
                                 "negatives": ["a sofa on a dog", ...]}
    groups (Winoground):        {"images": ["ex0_a.png", "ex0_b.png"],
                                 "captions": ["a mug in some grass", "some grass in a mug"]}

In a group, caption c is true of image c. `open_compositional(path)` tells the forms apart by
the first JSON object holding `negatives` (choice) or `images` (groups); rows of the other form
are then skipped as bad rows.

A bad row never stops the evaluation: invalid JSON, a missing field, an empty caption, a
negative equal to the true caption (the item could never be won), a group whose two captions or
two images are the same, an image file that is missing or empty, or an image path that resolves
outside the file's folder (refused before the file is touched, like pairs files) is skipped and
its reason kept in `.skipped`. A file without a single usable row is an error naming it.

The sets hold indices, not features: `texts` are the distinct caption strings, `images` the
distinct images (len() and [i] -> encoded bytes or a uint8 array, raising BrokenRecord when a
file cannot be read), and each item or group points into both. An evaluator encodes every image
and text once, drops the items of images that fail to decode (`without_images`), and scores the
rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from valign_jax.data.sources import _inside, _nonempty_file, _read_inside, _within
from valign_jax.data.transforms import BrokenRecord

log = logging.getLogger(__name__)
FORMS = ("choice: {image, caption, negatives: [...]}",
         "groups: {images: [a, b], captions: [c0, c1]}")


class ImageFiles:
    """Image files under a root: len() and [i] -> the file's bytes (BrokenRecord if unreadable
    or outside the root)."""

    def __init__(self, paths: Sequence[str], real_root: str):
        self.paths, self.real_root = tuple(paths), real_root

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index) -> bytes:
        return _read_inside(self.paths[index], self.real_root)

    def describe(self, index) -> str:
        return self.paths[index]


@dataclasses.dataclass(frozen=True)
class ChoiceSet:
    """Items of one image, one true caption and 1+ negative captions.

    image_index (N,) and positive (N,) index `images` and `texts`; negatives[n] holds the text
    indices of item n's negatives. `skipped`: the reason of every row left out."""
    name: str
    images: object
    texts: tuple[str, ...]
    image_index: np.ndarray
    positive: np.ndarray
    negatives: tuple[np.ndarray, ...]
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.image_index)

    def without_images(self, bad: dict[int, str]) -> "ChoiceSet":
        """The items whose image is not in `bad` ({image index: reason}); the others count as
        skipped with that reason. Image and text indices keep their meaning."""
        keep = np.array([int(i) not in bad for i in self.image_index], bool)
        dropped = tuple(f"item {n}: {bad[int(self.image_index[n])]}"
                        for n in np.flatnonzero(~keep))
        return dataclasses.replace(
            self, image_index=self.image_index[keep], positive=self.positive[keep],
            negatives=tuple(r for r, k in zip(self.negatives, keep) if k),
            skipped=self.skipped + dropped)


@dataclasses.dataclass(frozen=True)
class GroupSet:
    """Winoground-style groups: group_images[g] = (I0, I1) index `images`, group_texts[g] =
    (C0, C1) index `texts`, caption c true of image c."""
    name: str
    images: object
    texts: tuple[str, ...]
    group_images: np.ndarray
    group_texts: np.ndarray
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.group_images)

    def without_images(self, bad: dict[int, str]) -> "GroupSet":
        """The groups none of whose images is in `bad`; the others count as skipped."""
        keep = np.array([not ({int(a), int(b)} & set(bad)) for a, b in self.group_images], bool)
        dropped = tuple(f"group {g}: " + "; ".join(bad[int(i)] for i in self.group_images[g]
                                                   if int(i) in bad)
                        for g in np.flatnonzero(~keep))
        return dataclasses.replace(self, group_images=self.group_images[keep],
                                   group_texts=self.group_texts[keep],
                                   skipped=self.skipped + dropped)


# ---------------------------------------------------------------------------------------------
# JSONL


def _caption(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BrokenRecord(f"{where}: {field} must be a non-empty string, got {value!r:.80}")
    return value.strip()


class _Reader:
    """Shared state of one file: the root, distinct images and texts, skip reasons."""

    def __init__(self, path: Path):
        self.path = path
        self.root = os.path.abspath(path.parent)
        self.real_root = os.path.realpath(self.root)
        self.paths: dict[str, int] = {}
        self.texts: dict[str, int] = {}
        self.skipped: list[str] = []

    def image(self, value, where: str) -> str:
        """A row's image path, resolved and checked (inside the root, a non-empty file)."""
        if not isinstance(value, str) or not value.strip():
            raise BrokenRecord(f"{where}: no image path")
        path = os.path.normpath(os.path.join(self.root, value.strip()))
        if not _within(path, self.root) or not _inside(path, self.real_root):
            raise BrokenRecord(f"{where}: image {value!r} resolves outside the dataset root "
                               f"{self.root}; refused")
        if not _nonempty_file(path):
            raise BrokenRecord(f"{where}: image {path}: missing or empty file")
        return path

    def image_id(self, path: str) -> int:
        return self.paths.setdefault(path, len(self.paths))

    def text_id(self, text: str) -> int:
        return self.texts.setdefault(text, len(self.texts))

    def rows(self):
        """(where, JSON object) of each non-blank line; bad JSON is skipped here."""
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                where = f"{self.path}:{line}"
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    self.skipped.append(f"{where}: invalid JSON ({err})")
                    continue
                if not isinstance(row, dict):
                    self.skipped.append(f"{where}: a line must be a JSON object")
                    continue
                yield where, row

    def finish(self, count: int, form: str):
        if not count:
            raise ValueError(f"{self.path}: no usable {form} row among its lines; e.g. "
                             f"{self.skipped[:3]}. Expected forms: {list(FORMS)}")
        if self.skipped:
            log.warning("%s: %d rows skipped, e.g. %s", self.path, len(self.skipped),
                        self.skipped[0])


def read_choice_jsonl(path, name: str | None = None) -> ChoiceSet:
    """A choice JSONL (`{image, caption, negatives: [...]}` per line) -> ChoiceSet."""
    reader = _Reader(Path(path))
    image_index, positive, negatives = [], [], []
    for where, row in reader.rows():
        try:
            items = row.get("negatives")
            if not isinstance(items, list) or not items:
                raise BrokenRecord(f"{where}: negatives must be a non-empty list of captions")
            caption = _caption(row.get("caption"), where, "caption")
            negs = [_caption(v, where, f"negatives[{k}]") for k, v in enumerate(items)]
            if caption in negs:
                raise BrokenRecord(f"{where}: a negative equals the caption {caption!r}; the "
                                   f"item could never be won")
            image = reader.image(row.get("image"), where)
        except BrokenRecord as err:
            reader.skipped.append(str(err))
            continue
        image_index.append(reader.image_id(image))
        positive.append(reader.text_id(caption))
        negatives.append(np.array([reader.text_id(n) for n in negs], np.int64))
    reader.finish(len(image_index), "choice")
    return ChoiceSet(name or Path(path).stem, ImageFiles(reader.paths, reader.real_root),
                     tuple(reader.texts), np.array(image_index, np.int64),
                     np.array(positive, np.int64), tuple(negatives), tuple(reader.skipped))


def read_group_jsonl(path, name: str | None = None) -> GroupSet:
    """A groups JSONL (`{images: [a, b], captions: [c0, c1]}` per line) -> GroupSet."""
    reader = _Reader(Path(path))
    group_images, group_texts = [], []
    for where, row in reader.rows():
        try:
            images, captions = row.get("images"), row.get("captions")
            if not (isinstance(images, list) and isinstance(captions, list)
                    and len(images) == 2 and len(captions) == 2):
                raise BrokenRecord(f"{where}: a group needs 'images' and 'captions', two of each")
            captions = [_caption(c, where, f"captions[{k}]") for k, c in enumerate(captions)]
            if captions[0] == captions[1]:
                raise BrokenRecord(f"{where}: the two captions are the same")
            images = [reader.image(v, where) for v in images]
            if images[0] == images[1]:
                raise BrokenRecord(f"{where}: the two images are the same file")
        except BrokenRecord as err:
            reader.skipped.append(str(err))
            continue
        group_images.append([reader.image_id(p) for p in images])
        group_texts.append([reader.text_id(c) for c in captions])
    reader.finish(len(group_images), "group")
    return GroupSet(name or Path(path).stem, ImageFiles(reader.paths, reader.real_root),
                    tuple(reader.texts), np.array(group_images, np.int64).reshape(-1, 2),
                    np.array(group_texts, np.int64).reshape(-1, 2), tuple(reader.skipped))


def open_compositional(path, key: str = "path", name: str | None = None):
    """ChoiceSet or GroupSet by the file's form (the first object with `negatives` or `images`
    decides); `key` (the config key) is named in errors."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: not a file; expected a JSONL of one of "
                                f"{list(FORMS)}")
    with open(path, encoding="utf-8", errors="replace") as f:
        for text in f:
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "negatives" in row:
                return read_choice_jsonl(path, name)
            if isinstance(row, dict) and "images" in row:
                return read_group_jsonl(path, name)
    raise ValueError(f"{key}={str(path)!r}: no line is a JSON object with 'negatives' or "
                     f"'images'; expected one of {list(FORMS)}")
