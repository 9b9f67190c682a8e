"""The run's own objective on held-out data: its loss and metrics on batches it never trained
on, as `heldout/loss` and `heldout/<metric>` (a classifier's `heldout/accuracy`, a masked
language model's `heldout/mlm_accuracy`, a contrastive objective's batch accuracies).

    config.evals.heldout = recipes.eval_entry("objective")           # data: config.data.eval

Batches hold `config.batch_size` examples, as in training (an in-batch objective's figures
depend on it); the records that do not fill a last batch are left out. Randomness an objective
draws (masked positions) comes from a fixed seed, so every evaluation sees the same draws.
Objectives that need a teacher are not evaluated here: the teacher is the run's initial model,
which an evaluator does not hold.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from valign_jax import objectives, sharding
from valign_jax.evaluation.registry import EvalContext, EvaluatorType, register_evaluator
from valign_jax.train_step import model_outputs

SEED = 0


class HeldOutObjective:
    def __init__(self, ctx: EvalContext, entry):
        from valign_jax.data import pipeline
        from valign_jax.evaluation.build import open_eval_source
        config = ctx.config
        self.objective = objectives.build(config.objective, ctx.mesh)
        self.mesh, self.batch_size = ctx.mesh, config.batch_size
        key = "config.evals.<name>.data" if entry.data else "config.data.eval"
        source = open_eval_source(entry.data or config.data.eval, config, ctx.image_size, key)
        records = pipeline.eval_records(source, limit=entry.limit or None).records
        batches = len(records) // self.batch_size
        if not batches:
            raise ValueError(f"{key}: {len(records)} held-out records, fewer than one batch of "
                             f"config.batch_size={self.batch_size}; the objective evaluator "
                             f"needs at least one full batch")
        needs = self.objective.needs
        collate = dataclasses.replace(ctx.collate, labels="labels" in needs,
                                      multi_positive="second_caption" in needs)
        self.batches = [collate(records[i * self.batch_size:(i + 1) * self.batch_size])
                        for i in range(batches)]
        model, objective = ctx.model, self.objective

        def evaluate(params, batch, rng):
            out = model_outputs(model, params, batch, objective)
            value, metrics = objective(out, batch, rng)
            return {"loss": value, **metrics}
        self._evaluate = jax.jit(evaluate, in_shardings=(
            ctx.param_shardings, sharding.batch_sharding(ctx.mesh), None),
            out_shardings=sharding.replicated(ctx.mesh))

    def __call__(self, params) -> dict:
        count, index = jax.process_count(), jax.process_index()
        local = self.batch_size // count
        totals: dict[str, float] = {}
        for i, batch in enumerate(self.batches):
            rows = {k: v[index * local:(index + 1) * local] for k, v in batch.items()}
            metrics = jax.device_get(self._evaluate(params, sharding.global_batch(rows, self.mesh),
                                                    jax.random.fold_in(
                                                        jax.random.PRNGKey(SEED), i)))
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(np.mean(value))
        return {f"heldout/{name}": total / len(self.batches) for name, total in totals.items()}


def _check(config, entry, key) -> list[str]:
    kind = objectives.kinds().get(config.objective.kind)
    problems = []
    if kind is not None:
        try:
            needs = objectives.build(config.objective).needs
        except ValueError:
            needs = frozenset()  # reported by the objective's own checks
        if "teacher" in needs:
            problems.append(f"{key}: config.objective.kind={config.objective.kind!r} needs a "
                            f"teacher (the run's initial model), which the objective evaluator "
                            f"does not hold; remove {key}")
    if config.data.get("feature_cache"):
        problems.append(f"{key}: the objective evaluator runs the model on held-out records, but "
                        f"config.data.feature_cache={config.data.feature_cache!r} trains from "
                        f"cached tower features (the model has no towers); remove {key}")
    if entry.data:
        from valign_jax.data.sources import spec_problem
        problem = spec_problem(entry.data, f"{key}.data")
        problems += [problem] if problem else []
    if entry.limit < 0:
        problems.append(f"{key}.limit={entry.limit}: must be >= 0 (0: every record)")
    return problems


register_evaluator(EvaluatorType(
    name="objective", build=HeldOutObjective, check=_check, options={"limit": 0},
    help="the run's objective (loss and metrics) on held-out batches"))
