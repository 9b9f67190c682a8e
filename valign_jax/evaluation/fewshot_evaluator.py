"""The `fewshot` evaluator type: k-shot linear probes on the image tower's features (LiLT's and
SAIL's measure of what the vision side keeps; the probe is fewshot.py's closed-form ridge).

    config.evals.fewshot = recipes.eval_entry("fewshot", data="synthetic:shapes", limit=1000)
    config.evals.cifar = recipes.eval_entry("fewshot", data="tfds:cifar10/train",
                                            test="tfds:cifar10/test", shots="1,5,10,25")

`data` is a labelled source (tfds classification data, a class folder, synthetic:shapes) the
shots are drawn from; `test` the labelled source the probe is scored on. Without `test`, a
synthetic source is scored on its eval split, and any other is halved class by class by a
seeded permutation (shots from one half, scored on the other). `limit` reads at most that many usable records of
each (0: all; for synthetic data it is the number of examples drawn, else
config.data.num_train / num_eval). `shots` (comma-separated k), `seed` (which shots, as
fewshot.select_shots draws them), `centre` (centre the features on the shots' mean) and
`features`: "tower", the image tower's pooled output (what the vision tower keeps; for a run
that trains from cached features, the frozen tower's), or "embedding", the projected feature
of the joint space.

Metrics: `fewshot/<dataset>/<k>shot`, test top-1 accuracy. The largest k's shots are chosen
once when the evaluator is built and only those images are embedded at each evaluation; the
smaller k take the first k of each class's (select_shots nests them), so the numbers equal
fewshot.fewshot_metrics over the whole pool's features.
"""

from __future__ import annotations


import numpy as np

from valign_jax.evaluation import fewshot
from valign_jax.evaluation.build import dataset_name, entry_name
from valign_jax.evaluation.registry import EvaluatorType, register_evaluator

FEATURES = ("tower", "embedding")
OPTIONS = {"test": "", "shots": "1,5,10", "seed": 0, "limit": 0, "centre": False,
           "features": "tower"}


def tower_output(model, pixel_values):
    """The image tower's pooled output, before the head (a towerless model's cached feature)."""
    return model.vision_model(pixel_values)["pooled"]


def parse_shots(value, key: str = "shots") -> tuple[int, ...]:
    """"1,5,10" (or a list) -> (1, 5, 10): distinct positive integers, ascending."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        shots = sorted({int(str(v).strip()) for v in items if str(v).strip()})
    except ValueError:
        raise ValueError(f"{key}={value!r}: expected comma-separated positive integers (shots "
                         f"per class)") from None
    if not shots or shots[0] < 1:
        raise ValueError(f"{key}={value!r}: expected comma-separated positive integers (shots "
                         f"per class)")
    return tuple(shots)


class FewShotEvaluator:
    """k-shot ridge probes for each k of `shots`: pool_* (uint8 images, labels) are where the
    shots come from, test_* what the probes are scored on."""

    def __init__(self, encoder, inputs, pool_images, pool_labels, test_images, test_labels,
                 name: str, shots=(1, 5, 10), seed: int = 0, centre: bool = False,
                 features: str = "tower"):
        if features not in FEATURES:
            raise ValueError(f"features={features!r}: expected one of {FEATURES}")
        self.encoder, self.name, self.centre = encoder, name, centre
        self.shots = parse_shots(shots)
        self.method = tower_output if features == "tower" else "encode_image"
        k = self.shots[-1]
        pool_labels = np.asarray(pool_labels, np.int64)
        chosen = fewshot.select_shots(pool_labels, k, seed)  # class-major, k of each class
        self.shot_labels = pool_labels[chosen]
        self.num_classes = len(chosen) // k
        self.shot_images, self.shot_prepare = inputs.images(np.asarray(pool_images)[chosen])
        self.test_images, self.test_prepare = inputs.images(test_images)
        self.test_labels = np.asarray(test_labels, np.int64)

    def _features(self, params, images, prepare):
        return self.encoder.run(self.method, params, {"pixel_values": images}, prepare,
                                "embedding few-shot images")

    def __call__(self, params) -> dict[str, float]:
        shots = self._features(params, self.shot_images, self.shot_prepare)
        test = self._features(params, self.test_images, self.test_prepare)
        largest = self.shots[-1]
        metrics = {}
        for k in self.shots:  # each class's first k of its `largest` shots: select_shots(k)
            rows = (np.arange(self.num_classes)[:, None] * largest + np.arange(k)).ravel()
            accuracy, _ = fewshot.probe_shots(shots[rows], self.shot_labels[rows], test,
                                              self.test_labels, k, self.centre)
            metrics[f"fewshot/{self.name}/{k}shot"] = accuracy
        return metrics


# ---------------------------------------------------------------------------------------------
# The registered type


def _labelled(spec: str, split: str, config, image_size: int, limit: int, key: str):
    """(uint8 images, labels) of the first `limit` usable records (0: all) of a labelled
    source; a synthetic source draws `limit` examples of `split`."""
    from valign_jax.data import pipeline
    data_cfg = config.data
    if spec.startswith("synthetic:") and limit:
        data_cfg = config.data.copy_and_resolve_references()
        with data_cfg.unlocked():
            data_cfg.num_train = data_cfg.num_eval = limit
    source = pipeline.make_source(spec, split, data_cfg, image_size, key)
    pipeline.class_names(source)  # a source without labels is refused here, by name
    records = pipeline.eval_records(source, limit=limit or None).records
    return (np.stack([r["image"] for r in records]),
            np.asarray([r["label"] for r in records], np.int64))


def halves(labels, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool rows, test rows): each class's examples in a permutation seeded by (seed, class,
    1), the first half (rounded up) to the pool, the rest to the test."""
    labels = np.asarray(labels)
    pool, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[np.random.default_rng([int(seed), int(c), 1]).permutation(
            len(members))]
        cut = -(-len(members) // 2)
        pool.append(members[:cut])
        test.append(members[cut:])
    return np.sort(np.concatenate(pool)), np.sort(np.concatenate(test))


def _build(ctx, entry):
    key = f"config.evals.{entry_name(ctx, entry)}"
    config, size = ctx.config, ctx.image_size
    pool = _labelled(entry.data, "train", config, size, entry.limit, f"{key}.data")
    if entry.test:
        test = _labelled(entry.test, "eval", config, size, entry.limit, f"{key}.test")
    elif entry.data.startswith("synthetic:"):
        test = _labelled(entry.data, "eval", config, size, entry.limit, f"{key}.data")
    else:  # halve the one source, class by class: shots from one half, scored on the other
        pool, test = [tuple(a[part] for a in pool) for part in halves(pool[1], entry.seed)]
    try:
        return FewShotEvaluator(ctx.encoder, ctx.inputs, *pool, *test,
                                name=dataset_name(entry.data), shots=entry.shots,
                                seed=entry.seed, centre=entry.centre, features=entry.features)
    except ValueError as err:
        raise ValueError(f"{key} (data={entry.data!r}, limit={entry.limit}): {err}") from None


def _source_problem(spec: str, key: str) -> str | None:
    if spec.startswith("synthetic:"):
        return None if spec == "synthetic:shapes" else (
            f"{key}={spec!r}: the embedded labelled data is 'synthetic:shapes'")
    from valign_jax.data.sources import spec_problem
    return spec_problem(spec, key)


def _check(config, entry, key: str) -> list[str]:
    """A missing source or a bad option, named before any model is built."""
    problems = []
    if not entry.get("data"):
        problems.append(f"{key}.data is empty: give a labelled source (tfds classification "
                        f"data, a class folder, synthetic:shapes) to draw the shots from")
    for field in ("data", "test"):
        spec = str(entry.get(field, ""))
        problem = spec and _source_problem(spec, f"{key}.{field}")
        if problem:
            problems.append(problem)
    try:
        parse_shots(entry.get("shots", OPTIONS["shots"]), f"{key}.shots")
    except ValueError as err:
        problems.append(str(err))
    if entry.get("features", "tower") not in FEATURES:
        problems.append(f"{key}.features={entry.features!r}: expected one of {FEATURES}")
    if entry.get("limit", 0) < 0:
        problems.append(f"{key}.limit={entry.limit}: expected >= 0 (0: every record)")
    return problems


register_evaluator(EvaluatorType(
    name="fewshot", build=_build, check=_check, options=dict(OPTIONS),
    help="k-shot closed-form ridge probes on frozen image features"))
