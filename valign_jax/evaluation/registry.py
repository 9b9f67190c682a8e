"""Evaluator types by name, and the scheduled set of evaluators a run reports.

A config lists its evaluators in `config.evals`, one entry each (big_vision's `config.evals`):

    config.evals.retrieval = {"type": "retrieval", "every": 0, "data": ""}
    config.evals.cifar = {"type": "zeroshot", "every": 5000, "data": "tfds:cifar10/test"}

`type` names a registered EvaluatorType, `every` is its schedule in steps (0: config.eval_every;
every evaluator also runs at step 0 and at the last step), `data` its source ("": the type's
default, e.g. config.data.eval for retrieval), and the type's own options sit beside them. An
evaluator is any callable params -> {metric name: float}; it may keep `last_features` (image
features, and the text features paired with them) for the plots `evaluate` draws.

    register_evaluator(EvaluatorType(name="mine", build=build_mine, options={"k": 5}))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class EvaluatorType:
    """build(ctx: EvalContext, entry) -> an evaluator, or None when the entry asks for nothing
    (e.g. zero-shot with no datasets). options: the type's own entry keys with defaults (their
    types are the defaults'). check(config, entry, key) -> problems (each naming its config
    key) found before any model is built: missing files, bad option values."""

    name: str
    build: Callable
    help: str = ""
    options: dict = dataclasses.field(default_factory=dict)
    check: Callable | None = None


@dataclasses.dataclass
class EvalContext:
    """What an evaluator is built from: the run's config, model and mesh, where its parameters
    live, how records become model inputs, and the batched encoder."""

    config: Any
    model: Any
    mesh: Any
    param_shardings: Any
    collate: Any
    image_size: int
    encoder: Any                      # batched.FeatureEncoder
    eval_cache_dir: Any = None        # cached eval features (runs that train from a cache)
    inputs: Any = None                # inputs.ModelInputs: images and texts -> model inputs


_TYPES: dict[str, EvaluatorType] = {}


def register_evaluator(kind: EvaluatorType) -> EvaluatorType:
    _TYPES[kind.name] = kind
    return kind


def evaluator_types() -> dict[str, EvaluatorType]:
    return dict(_TYPES)


def evaluator_type(name: str) -> EvaluatorType:
    if name not in _TYPES:
        raise ValueError(f"unknown evaluator type {name!r}; known: {sorted(_TYPES)}")
    return _TYPES[name]


class Evaluators:
    """Several evaluators as one: their metrics merged. An evaluator with an `every` attribute
    runs only at its steps (and at step 0 and the last step); one without runs every time."""

    def __init__(self, *evaluators):
        self.evaluators = evaluators

    def due(self, step: int | None, final: bool = False) -> list:
        """The evaluators to run at `step` (None: all of them)."""
        if step is None or step == 0 or final:
            return list(self.evaluators)
        return [e for e in self.evaluators
                if not getattr(e, "every", None) or step % e.every == 0]

    def __call__(self, params, step: int | None = None, final: bool = False) -> dict:
        metrics, source = {}, {}
        for evaluator in self.due(step, final):
            name = getattr(evaluator, "entry_name", None)
            for metric, value in evaluator(params).items():
                if metric in metrics:  # one would silently overwrite the other
                    raise ValueError(
                        f"two evaluations report {metric!r}"
                        + (f" (config.evals.{source[metric]} and config.evals.{name})"
                           if name and source[metric] else "")
                        + ": give one of them other data, or drop one")
                metrics[metric], source[metric] = value, name
        return metrics


def build_evaluators(ctx: EvalContext) -> Evaluators:
    """The evaluators of `ctx.config.evals`, each with its schedule."""
    built = []
    for name, entry in ctx.config.get("evals", {}).items():
        evaluator = evaluator_type(entry.type).build(ctx, entry)
        if evaluator is None:
            continue
        evaluator.every = entry.get("every", 0) or ctx.config.eval_every
        evaluator.entry_name = name
        built.append(evaluator)
    if jax.process_index() == 0 and not built:
        from absl import logging
        logging.warning("config.evals asks for no evaluation: metrics.jsonl will hold only the "
                        "training loss")
    return Evaluators(*built)
