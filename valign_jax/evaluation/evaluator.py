"""Evaluators: embed a held-out split and report retrieval, zero-shot and geometry metrics under
DESIGN.md's names (`retrieval/i2t_r1`, `zeroshot/<dataset>/top1`, `geometry/gap`, ...). The
training loop and `python -m valign_jax.evaluate` run these same classes.

Features are computed on the mesh with the training shardings (no gathering of parameters to
one device); the batch is padded to a fixed size so each encoder compiles once. Images are kept
as uint8 and normalised one batch at a time, so a 5k-image split costs 0.75 GB at 224 px, not
four times that.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import numpy as np

from valign_jax import sharding
from valign_jax.evaluation import geometry, retrieval, zeroshot


def progress(iterable, total: int, desc: str):
    """A progress bar on process 0 for host loops long enough to want one (and named)."""
    if total < 8 or not desc or jax.process_index() != 0:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False)


class FeatureEncoder:
    """Jitted model methods over padded, sharded batches: encode_image / encode_text, and for
    fusion models their token variants and match_logits."""

    def __init__(self, model, mesh, param_shardings, batch_size: int):
        self.model, self.mesh, self.batch_size = model, mesh, batch_size
        self.param_shardings = param_shardings
        sharding.check_batch_size(batch_size, mesh, "config.eval.batch_size")
        self._compiled = {}

    def _method(self, name: str, num_inputs: int):
        """model.<name> jitted with the batch split over the mesh (compiled once, on first use)."""
        if name not in self._compiled:
            model = self.model

            def fn(params, *inputs):
                return model.apply({"params": params}, *inputs, method=getattr(model, name))
            batch_sh = sharding.batch_sharding(self.mesh)
            self._compiled[name] = jax.jit(
                fn, in_shardings=(self.param_shardings,) + (batch_sh,) * num_inputs,
                out_shardings=sharding.replicated(self.mesh))
        return self._compiled[name]

    def _run(self, name: str, params, arrays: dict, prepare: Callable | None = None,
             desc: str = ""):
        fn = self._method(name, len(arrays))
        n = len(next(iter(arrays.values())))
        count, index = jax.process_count(), jax.process_index()
        outputs = []
        starts = range(0, n, self.batch_size)
        for start in progress(starts, len(starts), desc):
            chunk = {k: v[start:start + self.batch_size] for k, v in arrays.items()}
            rows = len(next(iter(chunk.values())))
            pad = self.batch_size - rows
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) if pad else v
                     for k, v in chunk.items()}
            # Every process holds the whole batch; each passes its own slice of it.
            local = self.batch_size // count
            chunk = {k: v[index * local:(index + 1) * local] for k, v in chunk.items()}
            if prepare is not None:
                chunk = {k: prepare(v) for k, v in chunk.items()}
            out = fn(params, *sharding.global_batch(chunk, self.mesh).values())
            outputs.append(jax.tree.map(lambda o: np.asarray(o, np.float32)[:rows],
                                        jax.device_get(out)))
        return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)

    def images(self, params, pixel_values: np.ndarray, prepare: Callable | None = None):
        """Image features; `prepare` maps each batch first (uint8 pixels -> normalised)."""
        return self._run("encode_image", params, {"pixel_values": pixel_values}, prepare,
                         "embedding images")

    def texts(self, params, tokens: dict) -> np.ndarray:
        return self._run("encode_text", params, _text_inputs(tokens), None, "embedding texts")

    def image_tokens(self, params, pixel_values, prepare: Callable | None = None):
        """(image features, image tower tokens)."""
        return self._run("encode_image_tokens", params, {"pixel_values": pixel_values},
                         prepare, "embedding images")

    def text_tokens(self, params, tokens: dict):
        return self._run("encode_text_tokens", params, _text_inputs(tokens), None,
                         "embedding texts")

    def match(self, params, image_tokens, text_tokens, text_mask) -> np.ndarray:
        """Match logits of the pairs (image_tokens[p], text_tokens[p])."""
        # No bar: re-ranking calls this once per block of queries.
        return self._run("match_logits", params, {"image": image_tokens, "text": text_tokens,
                                                  "mask": text_mask})


def _text_inputs(tokens: dict) -> dict:
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


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


class RetrievalEvaluator:
    """Image<->text retrieval and the geometry metrics on a held-out split of pairs.

    Which caption counts as a hit: any caption of an image whose set of captions equals the
    query image's. For COCO (five captions of its own per image) that is the image's own
    captions; for the synthetic data, where many images share their attributes and so their
    captions, any of those images or captions is as right as the query's own.

    Captions carrying a `language` (a multilingual pairs file) are also scored per language:
    `retrieval/<language>/i2t_r1`, ... over the images captioned in that language.
    """

    def __init__(self, encoder: FeatureEncoder, records: Sequence[dict], collate):
        self.encoder = encoder
        images, captions, languages = _images_and_captions(records)
        groups: dict = {}
        self.image_keys = np.asarray([groups.setdefault(tuple(c), len(groups)) for c in captions])
        self.text_keys = np.repeat(self.image_keys, [len(c) for c in captions])
        self.text_languages = np.asarray([lang or "" for ls in languages for lang in ls])
        self.text_image = np.repeat(np.arange(len(images)), [len(c) for c in captions])
        self.pixel_values, self.prepare = _pixels(images), _normalizer(collate)
        self.tokens = collate.tokenizer([t for group in captions for t in group])
        # Geometry pairs each image with its first caption.
        self.first_caption = np.cumsum([0] + [len(c) for c in captions[:-1]])

    @classmethod
    def from_cache(cls, encoder: FeatureEncoder, cache, caption_sets=None):
        """Over cached tower features (feature_cache.CachedFeatures): the inputs are features,
        which the model's FeaturesTowers pass to the heads. Hits: the captions of images with
        the same caption set when `caption_sets` (per source index) is given, else an image's
        own captions."""
        self = cls.__new__(cls)
        self.encoder = encoder
        rows = [cache[i] for i in range(len(cache))]
        counts = [int(r["num_captions"]) for r in rows]
        groups: dict = {}
        keys = range(len(rows)) if caption_sets is None else (
            groups.setdefault(tuple(caption_sets[int(r["index"])]), len(groups)) for r in rows)
        self.pixel_values, self.prepare = np.stack([r["image_features"] for r in rows]), None
        texts = np.concatenate([r["text_features"][:n] for r, n in zip(rows, counts)])
        self.tokens = {"input_ids": texts,  # FeaturesTowers ignore the mask
                       "attention_mask": np.ones((len(texts), 1), np.int32)}
        self.image_keys = np.asarray(list(keys))
        self.text_keys = np.repeat(self.image_keys, counts)
        self.text_languages = np.full(len(texts), "")
        self.text_image = np.repeat(np.arange(len(rows)), counts)
        self.first_caption = np.cumsum([0] + counts[:-1])
        return self

    def features(self, params) -> tuple[np.ndarray, np.ndarray]:
        """(image features, text features): one row per image, one per caption."""
        return (self.encoder.images(params, self.pixel_values, self.prepare),
                self.encoder.texts(params, self.tokens))

    def run(self, params):
        """(metrics, image features, text features): the features for plots."""
        img, txt = self.features(params)
        return self.metrics(img, txt), img, txt

    def metrics(self, img: np.ndarray, txt: np.ndarray) -> dict[str, float]:
        metrics = {f"retrieval/{k}": v for k, v in retrieval.retrieval_metrics(
            img, txt, self.image_keys, self.text_keys).items()}
        for language in sorted(set(self.text_languages) - {""}):
            texts = np.flatnonzero(self.text_languages == language)
            images = np.unique(self.text_image[texts])
            metrics.update({f"retrieval/{language}/{k}": v for k, v in
                            retrieval.retrieval_metrics(img[images], txt[texts],
                                                        self.image_keys[images],
                                                        self.text_keys[texts]).items()})
        metrics.update({f"geometry/{k}": v for k, v in geometry.geometry_metrics(
            img, txt[self.first_caption]).items()})
        return metrics

    def __call__(self, params) -> dict[str, float]:
        return self.run(params)[0]


class ZeroShotEvaluator:
    """Zero-shot classification: each class's text embedding averages its prompt templates."""

    def __init__(self, encoder: FeatureEncoder, records: Sequence[dict], collate,
                 class_names: Sequence[str], templates: Sequence[str], name: str):
        self.encoder, self.name = encoder, name
        self.pixel_values, self.prepare = _pixels(records), _normalizer(collate)
        self.labels = np.asarray([r["label"] for r in records])
        self.num_classes, self.num_templates = len(class_names), len(templates)
        self.prompts = collate.tokenizer([t.format(c) for c in class_names for t in templates])

    def __call__(self, params) -> dict[str, float]:
        img = self.encoder.images(params, self.pixel_values, self.prepare)
        classes = zeroshot.class_embeddings(self.encoder.texts(params, self.prompts),
                                            self.num_classes, self.num_templates)
        return {f"zeroshot/{self.name}/{k}": v for k, v in
                zeroshot.zeroshot_metrics(img, classes, self.labels).items()}


class Evaluators:
    """Several evaluators as one: their metrics merged."""

    def __init__(self, *evaluators):
        self.evaluators = evaluators

    def __call__(self, params) -> dict[str, float]:
        metrics = {}
        for evaluator in self.evaluators:
            metrics.update(evaluator(params))
        return metrics


def eval_batch_size(requested: int, mesh) -> int:
    """The requested eval batch, rounded up to a multiple of the data-parallel size."""
    parallel = math.lcm(sharding.data_parallel_size(mesh), jax.process_count())
    return -(-requested // parallel) * parallel
