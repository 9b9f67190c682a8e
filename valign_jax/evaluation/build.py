"""The built-in evaluator types, registered by name for `config.evals` entries:

    retrieval   image-caption pairs (entry `data`, default config.data.eval): retrieval
                (+ per language) and geometry; fusion models also re-rank the top
                config.eval.rerank_k (config.eval.rerank_score); a run that trains from cached
                features evaluates on the cached features of config.data.eval
    zeroshot    zero-shot classification on each dataset of the entry's `data` (default
                config.eval.zeroshot, comma-separated: tfds classification data, class
                folders, synthetic:shapes), prompts by config.eval.templates ("auto" | "single"
                | "clip80" | "clip7" | a list), class names from config.eval.class_names (text
                files, one per dataset, matched by position; "" keeps a dataset's own names);
                a run that trains from cached features classifies the frozen towers'
                features of the images and prompts (computed once, cached beside its own)
    compositional, fewshot
                compositional_evaluator.py, fewshot_evaluator.py

`make_evaluator` builds the whole scheduled set for a run (training and `evaluate` alike).
"""

from __future__ import annotations

import re
from pathlib import Path

from valign_jax.batched import FeatureEncoder, eval_batch_size
from valign_jax.evaluation.evaluator import RetrievalEvaluator, RetrievalSet, ZeroShotEvaluator
from valign_jax.evaluation.inputs import ModelInputs
from valign_jax.evaluation.registry import (EvalContext, EvaluatorType, Evaluators,
                                            build_evaluators, register_evaluator)
from valign_jax.evaluation.templates import templates_for

_WORDNET_ID = re.compile(r"^n\d{8}$")


def make_evaluator(config, model, mesh, param_sh, collate, image_size: int,
                   eval_cache_dir=None, tower_features=None) -> Evaluators:
    """The evaluators of config.evals, each with its schedule. For runs that train from a
    feature cache: `eval_cache_dir`, the cached features of the eval split, and
    `tower_features` (frozen_towers.TowerFeatures), which runs the frozen towers over any other
    evaluation data once and caches what they compute."""
    encoder = FeatureEncoder(model, mesh, param_sh, eval_batch_size(config.eval.batch_size, mesh))
    if tower_features is not None:
        image_size = tower_features.image_size
    inputs = ModelInputs(collate, tower_features)
    try:
        return build_evaluators(EvalContext(config, model, mesh, param_sh, collate, image_size,
                                            encoder, eval_cache_dir, inputs))
    finally:
        if tower_features is not None:
            tower_features.release()  # the towers' weights are not needed after this


# ---------------------------------------------------------------------------------------------
# retrieval


def _retrieval(ctx: EvalContext, entry):
    from valign_jax.data import feature_cache, pipeline  # the data stack loads when evaluating
    config = ctx.config
    spec = entry.data or config.data.eval
    if ctx.eval_cache_dir is not None:  # features of the eval split, cached with the training one
        caption_sets = None
        if spec.startswith("synthetic:"):  # equal attributes share their captions
            source = open_eval_source(spec, config, ctx.image_size, "config.data.eval")
            caption_sets = [source[i]["captions"] for i in range(len(source))]
        cache = feature_cache.CachedFeatures(ctx.eval_cache_dir)
        return RetrievalEvaluator(ctx.encoder, data=RetrievalSet.from_cache(cache, caption_sets))
    key = f"config.evals.{entry_name(ctx, entry)}.data" if entry.data else "config.data.eval"
    records = pipeline.eval_records(open_eval_source(spec, config, ctx.image_size, key)).records
    if getattr(ctx.model, "fusion_layers", 0):  # a fusion model also re-ranks the top k
        from valign_jax.evaluation.rerank import RerankingEvaluator
        return RerankingEvaluator(ctx.encoder, records, ctx.collate, config.eval.rerank_k,
                                  config.eval.rerank_score)
    return RetrievalEvaluator(ctx.encoder, records, ctx.collate)


def entry_name(ctx, entry) -> str:
    """The name of `entry` in config.evals, for messages that name its keys."""
    return next((n for n, e in ctx.config.evals.items() if e is entry), entry.type)


def _check_retrieval(config, entry, key) -> list[str]:
    from valign_jax.data.sources import spec_problem
    problem = spec_problem(entry.data, f"{key}.data") if entry.data else None
    return [problem] if problem else []  # config.data.eval is the run's own check


register_evaluator(EvaluatorType(
    name="retrieval", build=_retrieval, check=_check_retrieval,
    help="image<->text recall@k and the geometry of the joint space on held-out pairs"))


# ---------------------------------------------------------------------------------------------
# zeroshot


def _zeroshot(ctx: EvalContext, entry):
    from valign_jax.data import pipeline
    config = ctx.config
    specs = split_list(entry.data or config.eval.zeroshot)
    if not specs:
        return None
    name_files = split_list(config.eval.class_names)
    if name_files and len(name_files) != len(specs):
        raise ValueError(f"config.eval.class_names lists {len(name_files)} files for "
                         f"{len(specs)} datasets in config.eval.zeroshot; give one per dataset "
                         f"(an empty entry keeps that dataset's own names)")
    evaluators = []
    for spec, names_file in zip(specs, name_files or [""] * len(specs)):
        source = open_eval_source(spec, config, ctx.image_size, "config.eval.zeroshot")
        names = read_class_names(names_file) if names_file else dataset_class_names(source)
        if len(names) != len(pipeline.class_names(source)):
            raise ValueError(f"{names_file}: {len(names)} class names, but {spec} has "
                             f"{len(pipeline.class_names(source))} classes")
        records = pipeline.eval_records(source, limit=config.eval.zeroshot_limit or None)
        templates = templates_for(config.eval.templates, spec)
        evaluators.append(ZeroShotEvaluator(ctx.encoder, records.records, ctx.collate, names,
                                            templates, dataset_name(spec), ctx.inputs))
    return evaluators[0] if len(evaluators) == 1 else Evaluators(*evaluators)


def _check_zeroshot(config, entry, key) -> list[str]:
    from valign_jax.data.sources import spec_problem
    source_key = f"{key}.data" if entry.data else "config.eval.zeroshot"
    specs = split_list(entry.data or config.eval.zeroshot)
    problems = [p for p in (spec_problem(spec, source_key) for spec in specs) if p]
    names = split_list(config.eval.class_names)
    if names and len(names) != len(specs):
        problems.append(f"config.eval.class_names lists {len(names)} files for {len(specs)} "
                        f"datasets in {source_key}; give one per dataset (an empty entry keeps "
                        f"that dataset's own names)")
    problems += [f"config.eval.class_names: {n} does not exist" for n in names
                 if n and not Path(n).expanduser().is_file()]
    return problems


register_evaluator(EvaluatorType(
    name="zeroshot", build=_zeroshot, check=_check_zeroshot,
    help="zero-shot classification with prompt-ensembled class embeddings"))


# ---------------------------------------------------------------------------------------------
# helpers


def split_list(value) -> list[str]:
    """A comma-separated config string (or a list) -> its stripped items, empties kept inside."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(i).strip() for i in items]


def open_eval_source(spec: str, config, image_size: int, key: str):
    from valign_jax.data import pipeline
    source = pipeline.make_source(spec, "eval", config.data, image_size, key)
    if len(source) == 0:
        hint = " (config.data.num_eval is 0)" if spec.startswith("synthetic:") else ""
        raise ValueError(f"{key}={spec!r}: the evaluation set is empty{hint}")
    return source


def dataset_class_names(source) -> tuple[str, ...]:
    """The class names a zero-shot prompt is written with; WordNet ids (tfds ImageNet) are
    refused, since no text tower reads 'n01440764' as 'tench'."""
    from valign_jax.data import pipeline
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
