"""The `compositional` evaluator type: does the model bind words the way the image does?

    config.evals.relations = recipes.eval_entry("compositional", data="synthetic:relations")
    config.evals.swap_att = recipes.eval_entry("compositional", data="/data/swap_att.jsonl")

`data` is a JSONL in either form of data/compositional.py (one true caption against negatives,
as SugarCrepe and ARO; or Winoground's groups of two images and two captions), or
`synthetic:relations`: the embedded held-out scenes in both forms (`num_groups` scenes, each
with its swapped-colour twin). Metrics (evaluation/compositional.py defines them):

    compositional/<dataset>/accuracy               the choice form
    compositional/<dataset>/{text,image,group}     the groups form
    compositional_reranked/<dataset>/...           fusion models: the same with the re-ranking
                                                   score (config.eval.rerank_score)

<dataset> is the file's name without its extension, or `relations`. The plain score is the dual
encoder's cosine; a fusion model's re-ranking score is the one its retrieval re-ranks with
(rerank.fusion_score). Every image and caption is encoded once per evaluation; images that fail
to decode drop their items (counted in the log), never the evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import logging

from valign_jax.evaluation import compositional
from valign_jax.evaluation.build import entry_name
from valign_jax.evaluation.registry import EvaluatorType, register_evaluator

SYNTHETIC = "synthetic:relations"


def decode_images(images, image_size: int) -> tuple[np.ndarray, dict[int, str]]:
    """A set's images (encoded bytes or uint8 arrays) -> (uint8 (N, S, S, 3), {index: why}
    for those that fail to decode; their rows are zeros)."""
    from valign_jax.data.transforms import BrokenRecord, EvalTransform
    transform = EvalTransform(image_size)
    out = np.zeros((len(images), image_size, image_size, 3), np.uint8)
    bad = {}
    for i in range(len(images)):
        describe = getattr(images, "describe", lambda i: f"image {i}")
        try:
            image = images[i]
            ready = (isinstance(image, np.ndarray) and image.dtype == np.uint8
                     and image.shape == out.shape[1:])
            out[i] = image if ready else transform(image)
        except BrokenRecord as err:
            bad[i] = f"{describe(i)}: {err}"
    return out, bad


class _Prepared:
    """One set (ChoiceSet or GroupSet) with its images and texts as model inputs."""

    def __init__(self, data, inputs, image_size: int):
        pixels, bad = decode_images(data.images, image_size)
        if bad:
            data = data.without_images(bad)
            logging.warning("compositional set %s: %d images cannot be decoded, their items "
                            "skipped (%d left), e.g. %s", data.name, len(bad), len(data),
                            next(iter(bad.values())))
            if not len(data):
                raise ValueError(f"compositional set {data.name}: no item is left once the "
                                 f"images that cannot be decoded are dropped, e.g. "
                                 f"{next(iter(bad.values()))}")
        self.data = data
        self.images, self.prepare = inputs.images(pixels)
        self.texts = inputs.texts(data.texts)

    def metrics(self, score) -> dict[str, float]:
        d = self.data
        if hasattr(d, "negatives"):  # a ChoiceSet; else a GroupSet
            return compositional.choice_metrics(score, d.image_index, d.positive, d.negatives)
        return compositional.group_metrics(score, d.group_images, d.group_texts)


def compositional_sets():
    from valign_jax.data import compositional as sets  # the data stack loads when evaluating
    return sets


class CompositionalEvaluator:
    """`compositional/<set>/...` of each set by cosine, and with `rerank_score` (fusion
    models) also `compositional_reranked/<set>/...` by the match head's score."""

    def __init__(self, encoder, inputs, sets, image_size: int, rerank_score: str | None = None):
        if rerank_score is not None and inputs.towerless:
            raise ValueError("a fusion model's match head needs the towers' tokens: it cannot "
                             "be evaluated from cached tower features")
        self.encoder, self.rerank_score = encoder, rerank_score
        self.sets = [_Prepared(s, inputs, image_size) for s in sets]

    def __call__(self, params) -> dict[str, float]:
        metrics = {}
        for part in self.sets:
            name = part.data.name
            if self.rerank_score is None:
                img = self.encoder.images(params, part.images, part.prepare)
                txt = self.encoder.texts(params, part.texts)
            else:
                from valign_jax.evaluation.rerank import fusion_score
                img, image_tokens = self.encoder.image_tokens(params, part.images, part.prepare)
                txt, text_tokens = self.encoder.text_tokens(params, part.texts)
                score = fusion_score(self.encoder, params, img, image_tokens, txt, text_tokens,
                                     part.texts["attention_mask"], self.rerank_score)
                metrics.update({f"compositional_reranked/{name}/{k}": v
                                for k, v in part.metrics(score).items()})
            metrics.update({f"compositional/{name}/{k}": v for k, v in
                            part.metrics(compositional.cosine_score(img, txt)).items()})
        return dict(sorted(metrics.items()))


def open_sets(spec: str, num_groups: int, image_size: int, seed: int, key: str) -> list:
    """The sets a `data` string names: both forms of the embedded relations, or a JSONL."""
    if spec == SYNTHETIC:
        from valign_jax.data.relations import relation_choices, relation_groups
        return [relation_choices(num_groups, image_size, seed),
                relation_groups(num_groups, image_size, seed)]
    return [compositional_sets().open_compositional(spec, key, name=Path(spec).stem)]


def _build(ctx, entry):
    key = f"config.evals.{entry_name(ctx, entry)}"
    sets = open_sets(entry.data, entry.num_groups, ctx.image_size, ctx.config.data.seed,
                     f"{key}.data")
    fusion = bool(getattr(ctx.model, "fusion_layers", 0))
    return CompositionalEvaluator(ctx.encoder, ctx.inputs, sets, ctx.image_size,
                                  ctx.config.eval.rerank_score if fusion else None)


def _check(config, entry, key: str) -> list[str]:
    """A missing file or a bad option, named before any model is built."""
    spec = str(entry.get("data", ""))
    problems = []
    if not spec:
        forms = " or ".join(compositional_sets().FORMS)
        problems.append(f"{key}.data is empty: give a compositional JSONL ({forms}) or "
                        f"{SYNTHETIC!r}")
    elif spec.startswith("synthetic:"):
        if spec != SYNTHETIC:
            problems.append(f"{key}.data={spec!r}: the embedded compositional data is "
                            f"{SYNTHETIC!r}")
    elif not Path(spec).expanduser().is_file():
        problems.append(f"{key}.data={spec!r}: no such file (a compositional JSONL)")
    if spec == SYNTHETIC:
        from valign_jax.data.relations import EVAL_SCENES
        n = entry.get("num_groups", 64)
        if not 1 <= n <= len(EVAL_SCENES):
            problems.append(f"{key}.num_groups={n}: expected 1 to {len(EVAL_SCENES)} (the "
                            f"held-out scenes)")
    return problems


register_evaluator(EvaluatorType(
    name="compositional", build=_build, check=_check, options={"num_groups": 64},
    help="compositional understanding: a true caption against negatives (SugarCrepe, ARO), "
         "Winoground's groups; data: a JSONL or synthetic:relations"))
