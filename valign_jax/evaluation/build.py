"""Evaluators from a config: what a training run reports every `eval_every` steps and what
`python -m valign_jax.evaluate` reports for a checkpoint, built by this one function.

    config.data.eval         image-caption pairs: retrieval (+ per language) and geometry;
                             fusion models re-rank the top config.eval.rerank_k
    config.eval.zeroshot     zero-shot datasets, comma-separated (tfds classification data,
                             class folders, synthetic:shapes)
    config.eval.templates    "auto" | "single" | "clip80" | "clip7" | a list (templates.py)
    config.eval.class_names  comma-separated text files (one class name per line), matched by
                             position with config.eval.zeroshot; empty: the dataset's own names
"""

from __future__ import annotations

import re
from pathlib import Path

from absl import logging

from valign_jax.data import feature_cache, pipeline
from valign_jax.evaluation.evaluator import (Evaluators, FeatureEncoder, RetrievalEvaluator,
                                             ZeroShotEvaluator, eval_batch_size)
from valign_jax.evaluation.templates import templates_for

_WORDNET_ID = re.compile(r"^n\d{8}$")


def make_evaluator(config, model, mesh, param_sh, collate, image_size: int,
                   eval_cache_dir=None) -> Evaluators:
    """Retrieval + geometry on config.data.eval (or its cached features in `eval_cache_dir`);
    zero-shot on each of config.eval.zeroshot."""
    encoder = FeatureEncoder(model, mesh, param_sh, eval_batch_size(config.eval.batch_size, mesh))
    if eval_cache_dir is not None:  # features of the eval split, cached with the training split
        eval_cache = feature_cache.CachedFeatures(eval_cache_dir)
        if config.eval.zeroshot:
            logging.warning("config.eval.zeroshot is not evaluated when training from cached "
                            "features: class prompts need the text tower")
        caption_sets = None
        if config.data.eval.startswith("synthetic:"):  # equal attributes share their captions
            source = _source(config.data.eval, config, image_size, "config.data.eval")
            caption_sets = [source[i]["captions"] for i in range(len(source))]
        return Evaluators(RetrievalEvaluator.from_cache(encoder, eval_cache, caption_sets))
    source = _source(config.data.eval, config, image_size, "config.data.eval")
    records = pipeline.eval_records(source).records
    if getattr(model, "fusion_layers", 0):  # a fusion model also re-ranks the top k
        from valign_jax.evaluation.rerank import RerankingEvaluator
        evaluators = [RerankingEvaluator(encoder, records, collate,
                                         config.eval.get("rerank_k", 10),
                                         config.eval.get("rerank_score", "itm+contrastive"))]
    else:
        evaluators = [RetrievalEvaluator(encoder, records, collate)]
    specs = split_list(config.eval.zeroshot)
    name_files = split_list(config.eval.get("class_names", ""))
    if name_files and len(name_files) != len(specs):
        raise ValueError(f"config.eval.class_names lists {len(name_files)} files for "
                         f"{len(specs)} datasets in config.eval.zeroshot; give one per dataset "
                         f"(an empty entry keeps that dataset's own names)")
    for spec, names_file in zip(specs, name_files or [""] * len(specs)):
        zs_source = source if spec == config.data.eval else _source(
            spec, config, image_size, "config.eval.zeroshot")
        names = read_class_names(names_file) if names_file else dataset_class_names(zs_source)
        if len(names) != len(pipeline.class_names(zs_source)):
            raise ValueError(f"{names_file}: {len(names)} class names, but {spec} has "
                             f"{len(pipeline.class_names(zs_source))} classes")
        zs_records = pipeline.eval_records(zs_source, limit=config.eval.zeroshot_limit or None)
        templates = templates_for(config.eval.get("templates", "auto"), spec)
        evaluators.append(ZeroShotEvaluator(encoder, zs_records.records, collate, names, templates,
                                            dataset_name(spec)))
    return Evaluators(*evaluators)


def split_list(value) -> list[str]:
    """A comma-separated config string (or a list) -> its stripped items, empties kept inside."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(i).strip() for i in items]


def _source(spec: str, config, image_size: int, key: str):
    source = pipeline.make_source(spec, "eval", config.data, image_size, key)
    if len(source) == 0:
        hint = " (config.data.num_eval is 0)" if spec.startswith("synthetic:") else ""
        raise ValueError(f"{key}={spec!r}: the evaluation set is empty{hint}")
    return source


def dataset_class_names(source) -> tuple[str, ...]:
    """The class names a zero-shot prompt is written with; WordNet ids (tfds ImageNet) are
    refused, since no text tower reads 'n01440764' as 'tench'."""
    names = pipeline.class_names(source)
    if names and all(_WORDNET_ID.match(n) for n in names[:10]):
        raise ValueError(f"{source.name}: its class names are WordNet ids ({names[0]}, ...), "
                         f"not words; set config.eval.class_names to a text file with its "
                         f"{len(names)} class names, one per line")
    return names


def read_class_names(path) -> tuple[str, ...]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config.eval.class_names: {path} does not exist")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise ValueError(f"config.eval.class_names: {path} holds no class names")
    return names


def dataset_name(spec: str) -> str:
    """A metric-name-friendly dataset name: synthetic:shapes -> synthetic, tfds:cifar100/test
    -> cifar100, a/b/classes -> classes."""
    if spec.startswith("synthetic:"):
        return "synthetic"
    if spec.startswith("tfds:"):
        return spec[len("tfds:"):].split("/")[0]
    return Path(spec.rstrip("/")).name.replace(".", "_") or "zeroshot"
