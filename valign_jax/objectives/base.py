"""What an objective is, what it may ask of the train step, and the registry of objectives.

An objective turns the model's outputs on a batch into a scalar loss and metrics:

    Objective(loss=fn, needs={"teacher"})      fn(out, batch, rng) -> (loss, {name: value})

`out` is the model's output dict (`DualEncoder.__call__`: "image", "text", "logit_scale",
"logit_bias" where the model has one, and a fusion model's tokens and "match_logits"), plus what
the objective declares in `needs`, which the train step then provides:

    "teacher"         out["teacher"]: the outputs of a frozen teacher on the same inputs (the
                      run's initial parameters; never differentiated, no optimizer state)
    "second_caption"  out["text_long"]: projected features of each image's second caption (the
                      pipeline then emits one: a record's long caption, else its caption)
    "model"           out["apply"](method, *args): any DualEncoder method under the parameters
                      being trained, differentiable (e.g. the fusion head scoring other pairs);
                      `method` a method's name, or a function (module, *args) run as a method
                      (it may read any submodule or parameter: masked_lm's tied decoder)
    "labels"          batch["labels"]: each example's integer class (the pipeline then emits
                      one: a record's `label`)

An objective without "model" sees only the model's outputs: such objectives are the ones a
step can compute from features cached per chunk (gradient caching).

Objectives are registered by name (`config.objective.kind`); auxiliary losses, which add a
weighted term to whatever objective is chosen, by the config key holding their weight. The
config checks take their choices from here, and nothing outside an objective's own module
looks at its name.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from valign_jax import losses, sharding

NEEDS = ("teacher", "second_caption", "model", "labels")
# `config.objective.chunked`: an option of every objective with a ring form (softmax, sigmoid).
RING_OPTIONS = {"chunked": False}
LossFn = Callable  # (out: dict, batch: dict, rng: jax.Array) -> (loss, metrics)


@dataclasses.dataclass(frozen=True)
class Objective:
    loss: LossFn
    needs: frozenset = frozenset()

    def __post_init__(self):
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"an objective needs {sorted(unknown)}; the train step provides "
                             f"{list(NEEDS)}")
        object.__setattr__(self, "needs", frozenset(self.needs))

    def __call__(self, out, batch, rng):
        return self.loss(out, batch, rng)


@dataclasses.dataclass(frozen=True)
class ObjectiveKind:
    """A registered objective.

    build(objective_cfg, mesh) -> Objective (mesh: the device mesh, for losses computed across
        devices; None on one device or in a dry run).
    options: `config.objective` keys only this objective reads, with their defaults: another
        objective chosen with one of them changed is refused by the config checks.
    check(config) -> a list of problems (each naming its config key) of a config that chose it.
    """

    name: str
    build: Callable
    help: str = ""
    options: dict = dataclasses.field(default_factory=dict)
    check: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Auxiliary:
    """A weighted extra loss: active when `config.objective.<weight_key>` > 0, it wraps the
    chosen objective (wrap(objective, objective_cfg) -> Objective). options/check as above,
    applying whenever it is active."""

    name: str
    weight_key: str
    wrap: Callable
    help: str = ""
    options: dict = dataclasses.field(default_factory=dict)
    check: Callable | None = None


_KINDS: dict[str, ObjectiveKind] = {}
_AUXILIARIES: dict[str, Auxiliary] = {}


def register(kind: ObjectiveKind) -> ObjectiveKind:
    _KINDS[kind.name] = kind
    return kind


def register_auxiliary(aux: Auxiliary) -> Auxiliary:
    _AUXILIARIES[aux.name] = aux
    return aux


def kinds() -> dict[str, ObjectiveKind]:
    return dict(_KINDS)


def auxiliaries() -> dict[str, Auxiliary]:
    return dict(_AUXILIARIES)


def build(objective_cfg, mesh=None) -> Objective:
    """The objective `config.objective` chooses, with every active auxiliary loss added."""
    if objective_cfg.kind not in _KINDS:
        raise ValueError(f"config.objective.kind={objective_cfg.kind!r}; expected one of "
                         f"{sorted(_KINDS)}")
    objective = _KINDS[objective_cfg.kind].build(objective_cfg, mesh)
    for aux in _AUXILIARIES.values():
        if objective_cfg.get(aux.weight_key, 0):
            objective = aux.wrap(objective, objective_cfg)
    return objective


def unit(x):
    """Rows scaled to unit L2 norm."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def batch_metrics(img, txt, scale, bias=None, mesh=None) -> dict:
    """The in-batch retrieval metrics of the training log (unit features in): dense, or around
    the ring of the mesh's batch devices (a ring loss's run would otherwise hold the B×B logits
    for its metrics alone)."""
    if mesh is None:
        return losses.contrastive_metrics(img, txt, scale, bias)
    img, txt = jax.lax.stop_gradient(img), jax.lax.stop_gradient(txt)
    return losses.chunked_contrastive_metrics(img, txt, scale, bias, mesh=mesh,
                                              axis_name=sharding.BATCH_AXES)
