"""Objectives: each a unit in its own module, registered by name (`config.objective.kind`).

    objective = objectives.build(config.objective, mesh)   # the chosen one + auxiliary losses
    loss, metrics = objective(out, batch, rng)

base.py says what an objective is and what it may ask of the train step (`needs`); the built-in
objectives register themselves when this package is imported. A new objective is one module
calling `register(ObjectiveKind(...))`: docs/architecture.md.
"""

from valign_jax.objectives.base import (NEEDS, Auxiliary, Objective, ObjectiveKind, auxiliaries,
                                        build, kinds, register, register_auxiliary, unit)
from valign_jax.objectives import (classification, clip_refine, contrastive, itm,  # noqa: F401
                                   masked_lm, sigmoid)  # (register)
from valign_jax.objectives.classification import classification_objective
from valign_jax.objectives.clip_refine import clip_refine_objective
from valign_jax.objectives.contrastive import contrastive_objective
from valign_jax.objectives.itm import itm_objective
from valign_jax.objectives.masked_lm import masked_lm_objective
from valign_jax.objectives.sigmoid import sigmoid_objective

__all__ = ["NEEDS", "Auxiliary", "Objective", "ObjectiveKind", "auxiliaries", "build", "kinds",
           "register", "register_auxiliary", "unit", "classification_objective",
           "clip_refine_objective", "contrastive_objective", "itm_objective",
           "masked_lm_objective", "sigmoid_objective"]
