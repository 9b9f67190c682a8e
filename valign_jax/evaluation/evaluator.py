"""The built-in evaluators: embed a held-out split and report retrieval, zero-shot and geometry
metrics under the names docs/metrics.md defines (`retrieval/i2t_r1`, `zeroshot/<dataset>/top1`,
`geometry/gap`, ...). The training loop and `python -m valign_jax.evaluate` run these same
classes (built from the config by evaluation/build.py).

Features are computed on the mesh with the training shardings (batched.FeatureEncoder). Images
are kept as uint8 and normalised one batch at a time, so a 5k-image split costs 0.75 GB at
224 px, not four times that.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from valign_jax.evaluation import geometry, retrieval, zeroshot
from valign_jax.evaluation.inputs import ModelInputs


def _pixels(records) -> np.ndarray:
    return np.stack([r["image"] for r in records])


def _normalizer(collate) -> Callable:
    from valign_jax.data.pipeline import normalize
    return lambda images: normalize(images, collate.mean, collate.std)


def _images_and_captions(records: Sequence[dict]):
    """Records -> (one record per image, its captions, their languages). Records with the same
    `image_id` (a pairs file listing an image once per caption or per language) are one image
    with all their captions; records without one are each their own image."""
    first, captions, languages = [], [], []
    slot: dict = {}
    for r in records:
        key = r.get("image_id")
        texts = list(r.get("captions") or [r["caption"]])
        if key is None or key not in slot:
            if key is not None:
                slot[key] = len(first)
            first.append(r)
            captions.append([])
            languages.append([])
        i = len(first) - 1 if key is None else slot[key]
        captions[i] += texts
        languages[i] += [r.get("language")] * len(texts)
    return first, captions, languages


@dataclasses.dataclass
class RetrievalSet:
    """A held-out split as retrieval needs it: the inputs of the image and text encoders (pixels
    and tokens, or cached tower features for a model whose towers are precomputed), and which
    image and caption belong together.

    Which caption counts as a hit: any caption of an image whose set of captions equals the
    query image's (`image_keys` / `text_keys`). For COCO (five captions of its own per image)
    that is the image's own captions; for the synthetic data, where many images share their
    attributes and so their captions, any of those images or captions is as right as the
    query's own. Captions carrying a `language` are also scored per language.
    """

    images: np.ndarray                 # encode_image's input, one row per image
    texts: dict                        # encode_text's inputs, one row per caption
    image_keys: np.ndarray             # caption-set code per image
    text_keys: np.ndarray              # ... per caption
    text_image: np.ndarray             # the image each caption belongs to
    text_languages: np.ndarray         # "" where unknown
    prepare: Callable | None = None    # applied to each batch of images (uint8 -> normalised)

    @property
    def first_caption(self) -> np.ndarray:
        """Each image's first caption (geometry pairs them)."""
        return np.searchsorted(self.text_image, np.arange(len(self.images)))

    @classmethod
    def from_records(cls, records: Sequence[dict], collate) -> "RetrievalSet":
        images, captions, languages = _images_and_captions(records)
        groups: dict = {}
        image_keys = np.asarray([groups.setdefault(tuple(c), len(groups)) for c in captions])
        counts = [len(c) for c in captions]
        return cls(images=_pixels(images),
                   texts=collate.tokenizer([t for group in captions for t in group]),
                   image_keys=image_keys, text_keys=np.repeat(image_keys, counts),
                   text_image=np.repeat(np.arange(len(images)), counts),
                   text_languages=np.asarray([lang or "" for ls in languages for lang in ls]),
                   prepare=_normalizer(collate))

    @classmethod
    def from_cache(cls, cache, caption_sets=None) -> "RetrievalSet":
        """Over cached tower features (feature_cache.CachedFeatures). Hits: the captions of
        images with the same caption set when `caption_sets` (per source index) is given, else
        an image's own captions."""
        rows = [cache[i] for i in range(len(cache))]
        counts = [int(r["num_captions"]) for r in rows]
        groups: dict = {}
        keys = range(len(rows)) if caption_sets is None else (
            groups.setdefault(tuple(caption_sets[int(r["index"])]), len(groups)) for r in rows)
        image_keys = np.asarray(list(keys))
        features = np.concatenate([r["text_features"][:n] for r, n in zip(rows, counts)])
        return cls(images=np.stack([r["image_features"] for r in rows]),
                   # a features "tower" ignores the mask
                   texts={"input_ids": features,
                          "attention_mask": np.ones((len(features), 1), np.int32)},
                   image_keys=image_keys, text_keys=np.repeat(image_keys, counts),
                   text_image=np.repeat(np.arange(len(rows)), counts),
                   text_languages=np.full(len(features), ""))


class RetrievalEvaluator:
    """Image<->text retrieval and the geometry metrics on a held-out split (a RetrievalSet,
    from records or from cached features); per language where captions carry one."""

    def __init__(self, encoder, records: Sequence[dict] | None = None, collate=None, *,
                 data: RetrievalSet | None = None):
        self.encoder = encoder
        self.data = data if data is not None else RetrievalSet.from_records(records, collate)
        self.last_features = None

    # the split's parts, as the re-ranker and the tests read them
    tokens = property(lambda self: self.data.texts)
    image_keys = property(lambda self: self.data.image_keys)
    text_keys = property(lambda self: self.data.text_keys)

    def features(self, params) -> tuple[np.ndarray, np.ndarray]:
        """(image features, text features): one row per image, one per caption."""
        return (self.encoder.images(params, self.data.images, self.data.prepare),
                self.encoder.texts(params, self.data.texts))

    def run(self, params):
        """(metrics, image features, text features)."""
        img, txt = self.features(params)
        return self.metrics(img, txt), img, txt

    def metrics(self, img: np.ndarray, txt: np.ndarray) -> dict[str, float]:
        d = self.data
        metrics = {f"retrieval/{k}": v for k, v in retrieval.retrieval_metrics(
            img, txt, d.image_keys, d.text_keys).items()}
        for language in sorted(set(d.text_languages) - {""}):
            texts = np.flatnonzero(d.text_languages == language)
            images = np.unique(d.text_image[texts])
            metrics.update({f"retrieval/{language}/{k}": v for k, v in
                            retrieval.retrieval_metrics(img[images], txt[texts],
                                                        d.image_keys[images],
                                                        d.text_keys[texts]).items()})
        first = txt[d.first_caption]
        self.last_features = (img, first)  # for the plots `evaluate` draws
        metrics.update({f"geometry/{k}": v for k, v in geometry.geometry_metrics(
            img, first).items()})
        return metrics

    def __call__(self, params) -> dict[str, float]:
        return self.run(params)[0]


class ZeroShotEvaluator:
    """Zero-shot classification: each class's text embedding averages its prompt templates.
    `inputs` (inputs.ModelInputs; default: pixels and tokens by `collate`) says what the
    model reads: for a towerless model, the frozen towers' features of the images and prompts,
    computed here once."""

    def __init__(self, encoder, records: Sequence[dict], collate,
                 class_names: Sequence[str], templates: Sequence[str], name: str,
                 inputs=None):
        inputs = inputs or ModelInputs(collate)
        self.encoder, self.name = encoder, name
        self.images, self.prepare = inputs.images(_pixels(records))
        self.labels = np.asarray([r["label"] for r in records])
        self.num_classes, self.num_templates = len(class_names), len(templates)
        self.prompts = inputs.texts([t.format(c) for c in class_names for t in templates])

    def __call__(self, params) -> dict[str, float]:
        img = self.encoder.images(params, self.images, self.prepare)
        classes = zeroshot.class_embeddings(self.encoder.texts(params, self.prompts),
                                            self.num_classes, self.num_templates)
        return {f"zeroshot/{self.name}/{k}": v for k, v in
                zeroshot.zeroshot_metrics(img, classes, self.labels).items()}
