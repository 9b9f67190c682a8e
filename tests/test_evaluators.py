"""The evaluators that run during training, on features we choose: which caption counts as a
hit, and that zero-shot averages its templates."""

import numpy as np
import pytest

from valign_jax.evaluation.evaluator import RetrievalEvaluator, ZeroShotEvaluator
from valign_jax.evaluation.registry import Evaluators


class Collate:
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def tokenizer(self, texts):
        return {"texts": list(texts)}


class LookupEncoder:
    """Images -> the feature stored in their first pixel's red value; texts -> a table."""

    def __init__(self, image_features, text_features):
        self.image_features, self.text_features = image_features, text_features

    def images(self, params, pixel_values, prepare=None):
        pixel_values = prepare(pixel_values) if prepare else pixel_values
        index = np.rint((pixel_values[:, 0, 0, 0] + 1) * 127.5).astype(int)
        return self.image_features[index]

    def texts(self, params, tokens):
        return np.stack([self.text_features[t] for t in tokens["texts"]])


def image(i):
    return np.full((2, 2, 3), i, np.uint8)


def test_an_image_sharing_the_query_caption_set_counts_as_a_hit():
    # Images 0 and 1 share their caption set (same attributes); image 2 has its own.
    records = [{"image": image(0), "caption": "a", "captions": ("a", "a2")},
               {"image": image(1), "caption": "a", "captions": ("a", "a2")},
               {"image": image(2), "caption": "b", "captions": ("b",)}]
    e = np.eye(3)
    # Image 0's nearest text is "a2", image 1's is "a" (both right: same set); image 2's
    # nearest is "a" (wrong).
    images = np.stack([e[0], e[0] + 0.1 * e[1], e[1]])
    texts = {"a": e[0] + 0.5 * e[1], "a2": e[0], "b": e[2]}
    metrics = RetrievalEvaluator(LookupEncoder(images, texts), records, Collate())(None)
    assert metrics["retrieval/i2t_r1"] == pytest.approx(2 / 3)
    # Texts a, a2 (x2 images) hit image 0 or 1; "b"'s nearest image is 2? it is orthogonal
    # to every image but image 2's e[1] is closest after normalising nothing - all zero, the
    # stable tie goes to image 0, a miss.
    assert metrics["retrieval/t2i_r1"] == pytest.approx(4 / 5)
    assert metrics["retrieval/i2t_r5"] == metrics["retrieval/t2i_r5"] == 1.0
    assert {"geometry/gap", "geometry/alignment"} <= set(metrics)


def test_zero_shot_averages_templates_and_names_the_dataset():
    records = [{"image": image(i), "label": label} for i, label in enumerate([0, 1, 1])]
    e = np.eye(2)
    images = np.stack([e[0], e[1], e[0]])  # the third is misclassified
    texts = {"a cat": e[0], "art of cat": e[0], "a dog": e[1], "art of dog": e[1]}
    evaluator = ZeroShotEvaluator(LookupEncoder(images, texts), records, Collate(),
                                  ["cat", "dog"], ["a {}", "art of {}"], "pets")
    metrics = Evaluators(evaluator)(None)
    assert metrics == {"zeroshot/pets/top1": pytest.approx(2 / 3), "zeroshot/pets/top5": 1.0,
                       "zeroshot/pets/mean_per_class_recall": pytest.approx((1 + 1 / 2) / 2)}


def test_rows_of_one_image_file_are_one_image_and_languages_are_scored_apart():
    """A multilingual pairs file lists image 0 twice (en, de) and image 1 twice (en, de):
    2 images and 4 captions overall; per language, 2 images and 2 captions."""
    records = [{"image": image(0), "image_id": "x.png", "caption": "red", "language": "en"},
               {"image": image(1), "image_id": "y.png", "caption": "blue", "language": "en"},
               {"image": image(0), "image_id": "x.png", "caption": "rot", "language": "de"},
               {"image": image(1), "image_id": "y.png", "caption": "blau", "language": "de"}]
    e = np.eye(2)
    images = np.stack([e[0], e[1]])
    # English captions are right; German ones are swapped (rot sits next to the blue image).
    texts = {"red": e[0], "blue": e[1], "rot": e[1], "blau": e[0]}
    evaluator = RetrievalEvaluator(LookupEncoder(images, texts), records, Collate())
    assert len(evaluator.data.images) == 2 and evaluator.tokens["texts"] == [
        "red", "rot", "blue", "blau"]
    metrics = evaluator(None)
    assert metrics["retrieval/en/i2t_r1"] == metrics["retrieval/en/t2i_r1"] == 1.0
    assert metrics["retrieval/de/i2t_r1"] == metrics["retrieval/de/t2i_r1"] == 0.0
    # Overall: each image's nearest captions are a right and a wrong one, tied; the stable
    # tie-break picks the lower index (red for image 0: hit; rot for image 1: miss).
    assert metrics["retrieval/i2t_r1"] == 0.5 and metrics["retrieval/t2i_r1"] == 0.5
    assert metrics["retrieval/i2t_r5"] == 1.0


def test_two_evaluations_reporting_one_metric_name_are_refused_by_entry():
    """Two config.evals entries whose metrics share a name (e.g. two retrieval entries) would
    overwrite each other in metrics.jsonl: the evaluation names both entries instead."""
    def reporting(entry, value):
        def evaluate(params):
            return {"retrieval/i2t_r1": value, f"own/{entry}": value}
        evaluate.entry_name = entry
        return evaluate
    with pytest.raises(ValueError, match=r"'retrieval/i2t_r1' \(config.evals.coco and "
                                         r"config.evals.flickr\)"):
        Evaluators(reporting("coco", 0.5), reporting("flickr", 0.25))(None)
    assert Evaluators(reporting("coco", 0.5))(None) == {"retrieval/i2t_r1": 0.5, "own/coco": 0.5}
