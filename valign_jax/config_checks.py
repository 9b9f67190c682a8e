"""A whole config checked before any compute: unknown keys, wrong types, values out of range and
options that contradict each other. Every problem names its config key, and all of them are
reported at once.

    from valign_jax.config_checks import check_config
    check_config(config)        # ConfigError: "config.data.feature_cahce: unknown key; did you ..."

Keys and types are those of `base_config()` in configs/common.py, the defaults every recipe builds
on: a key added there is known here, with no second list to keep in step. Beyond those, a recipe
may set `variant` (its variant name) and `data.augment` (transforms.TrainTransform fields).

main.py checks a config before a dry run (devices=False: it describes the model, not this
machine) and before caching features; train.train_and_evaluate checks it first thing, so a bad
config fails in well under a second, before a workdir is made, a model built or a step compiled.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import numbers
from pathlib import Path

REFERENCE_FILE = Path(__file__).resolve().parent.parent / "configs" / "common.py"
OPTIONAL = {"variant": str, "data.augment": dict}   # keys a config may add to the reference
ALSO_ACCEPTED = {"eval.templates": (list, tuple)}   # a template set's name, or the templates

# key: (lowest, highest) allowed, both inclusive; None: unbounded on that side
RANGES = {
    "batch_size": (1, None), "total_steps": (0, None), "log_every": (1, None),
    "eval_every": (1, None), "checkpoint_every": (1, None), "keep_checkpoints": (1, None),
    "mesh.min_fsdp_size": (1, None), "objective.itm_weight": (0, None),
    "objective.itm_negatives": (1, None),
    "objective.clip_refine.alpha": (0, 1),
    "data.num_train": (1, None), "data.num_eval": (1, None), "data.threads": (0, None),
    "data.workers": (0, None),
    "eval.zeroshot_limit": (0, None), "eval.rerank_k": (1, None), "eval.batch_size": (1, None),
    "model.projection_dim": (1, None), "model.fusion_layers": (0, None),
    "model.fusion_heads": (1, None), "model.fusion_width": (0, None),
    **{f"model.{side}.{key}": (0, None) for side in ("image", "text")
       for key in ("adapter_dim", "deep_layers", "image_size")},
    "model.text.max_length": (2, None),
    **{f"optim.{key}": (0, None) for key in ("lr", "warmup_init_lr", "end_lr", "warmup_steps",
                                             "weight_decay", "grad_clip_norm")},
}
POSITIVE = ("objective.clip_refine.prior_std", "objective.clip_refine.temperature", "optim.eps")
BELOW_ONE = ("optim.warmup_fraction", "optim.b1", "optim.b2")   # in [0, 1)
CHOICES = {
    "objective.kind": ("softmax", "sigmoid", "clip_refine"),
    "objective.norm": ("batch", "pairs"),
    "objective.clip_refine.rafa_form": ("official", "paper"),
    "objective.clip_refine.hycd_features": ("raw", "normalized"),
    "optim.name": ("adamw", "lion", "sgd"),
    "on_nonfinite": ("stop", "skip"),    # train._train_loop: stop naming the step, or skip it
}
SIGMOID_ONLY = {"norm": "batch", "multi_positive": False, "chunked": False}  # and their defaults


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem by config key."""


def check_config(config, *, devices=True, mode: str = "train") -> None:
    """Raise ConfigError naming every problem of `config` (and of its `pretrain` stage).

    devices: True checks the mesh and the batch against this machine's devices, a list against
    those, False skips it. mode: "train", or "cache_features" (needs data.feature_cache)."""
    problems = find_problems(config, devices=devices, mode=mode)
    if problems:
        raise ConfigError(f"invalid config ({len(problems)} problem"
                          f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems))


def find_problems(config, *, devices=True, mode: str = "train", _seen=()) -> list[str]:
    """check_config's problems as a list of messages (empty: the config can run)."""
    unknown, broken = [], []
    if reference() is not None:
        structure_problems(config, reference(), "config", unknown, broken)
    else:
        logging.warning("%s not found: config keys and types are not checked", REFERENCE_FILE)
    if broken:  # the value checks below read keys that are missing or mistyped
        return unknown + broken
    problems = unknown + value_problems(config) + combination_problems(config, mode)
    if devices and not problems:
        problems += device_problems(config, devices)
    spec = config.get("pretrain", "")
    if spec and not problems and spec not in _seen:
        from valign_jax.run_setup import load_config  # FileNotFoundError names a missing file
        try:
            stage = find_problems(load_config(spec), devices=devices, _seen=(*_seen, spec))
        except ValueError as err:  # e.g. an unknown config argument
            stage = [str(err)]
        problems += [f"config.pretrain={spec!r}: {p}" for p in stage]
    return problems


@functools.cache
def reference():
    """configs/common.py's base_config(); None where the package runs without its configs/."""
    if not REFERENCE_FILE.is_file():
        return None
    spec = importlib.util.spec_from_file_location("valign_configs_common", REFERENCE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.base_config()


def get(config, dotted: str):
    return functools.reduce(lambda node, key: node[key], dotted.split("."), config)


# ---------------------------------------------------------------------------------------------
# Keys and types, against the reference


def _is_section(value) -> bool:
    return hasattr(value, "keys") and hasattr(value, "__getitem__")


def structure_problems(config, ref, path: str, unknown: list, broken: list) -> None:
    """Unknown keys of `config` (a section at `path`) into `unknown`, missing and mistyped ones
    into `broken`, against the reference section `ref`."""
    for key in config.keys():
        where, value = f"{path}.{key}", config[key]
        dotted = where.split(".", 1)[1]
        if key not in ref:
            if dotted in OPTIONAL:
                expected = OPTIONAL[dotted]
                if not (_is_section(value) if expected is dict else isinstance(value, expected)):
                    broken.append(f"{where}: expected {_name(expected)}, got {_shown(value)}")
                continue
            close = difflib.get_close_matches(str(key), list(ref.keys()), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            unknown.append(f"{where}: unknown key{hint} (valid keys of {path}: "
                           f"{sorted(ref.keys())})")
        elif _is_section(ref[key]):
            if _is_section(value):
                structure_problems(value, ref[key], where, unknown, broken)
            else:
                broken.append(f"{where}: expected a section of keys, got {_shown(value)}")
        else:
            problem = _type_problem(value, ref.get_type(key), ref[key], ALSO_ACCEPTED.get(dotted))
            if problem:
                broken.append(f"{where}: {problem}")
    broken += [f"{path}.{key}: missing (configs/common.py's base_config() has every key with "
               f"its default; build on it)" for key in ref.keys() if key not in config]


def _type_problem(value, expected: type, default, also=None) -> str | None:
    """Why `value` cannot stand where the reference holds `default` of type `expected`."""
    if also and isinstance(value, also):
        return None
    if value is None:  # only placeholders (reference None) may be None
        return None if default is None else f"expected {_name(expected)}, got None"
    if isinstance(value, bool) or expected is bool:
        ok = isinstance(value, bool) and expected is bool
    elif expected is int:
        ok = isinstance(value, numbers.Integral)
    elif expected is float:
        ok = isinstance(value, numbers.Real)
    elif expected in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return f"expected a list or tuple, got {_shown(value)}"
        if default and len(value) != len(default):  # fixed-length vectors: mean, std, weights
            return f"expected {len(default)} items, got {len(value)}"
        for item, item_default in zip(value, default or ()):
            problem = _type_problem(item, type(item_default), item_default)
            if problem:
                return f"item {item!r}: {problem}"
        return None
    else:
        ok = isinstance(value, expected)
    return None if ok else f"expected {_name(expected)}, got {_shown(value)}"


def _name(kind: type) -> str:
    return {int: "an int", float: "a number", str: "a string", bool: "True or False",
            dict: "a section of keys"}.get(kind, kind.__name__)


def _shown(value) -> str:
    return f"{type(value).__name__} {value!r}"


# ---------------------------------------------------------------------------------------------
# Values, one key at a time


def _choices() -> dict:
    """CHOICES plus the names the code itself defines (imported here: they live with the code)."""
    from valign_jax import losses, peft
    from valign_jax.evaluation.rerank import RERANK_SCORES
    from valign_jax.models.config import DTYPES
    from valign_jax.models.layers import HEADS, REMAT_POLICIES
    return {**CHOICES, "model.logit_preset": tuple(losses.LOGIT_SCALE_PRESETS),
            "model.image_head": HEADS, "model.text_head": HEADS, "model.dtype": tuple(DTYPES),
            "model.remat": tuple(REMAT_POLICIES), "model.adapter_init": ("normal", "identity"),
            "peft.recipe": tuple(peft.RECIPES), "eval.rerank_score": RERANK_SCORES}


def value_problems(config) -> list[str]:
    problems = []
    for key, (low, high) in RANGES.items():
        value = get(config, key)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            problems.append(f"config.{key}={value!r}: must be {bounds}")
    problems += [f"config.{key}={get(config, key)!r}: must be > 0" for key in POSITIVE
                 if get(config, key) <= 0]
    problems += [f"config.{key}={get(config, key)!r}: must be in [0, 1)" for key in BELOW_ONE
                 if not 0 <= get(config, key) < 1]
    if not config.total_steps and config.num_epochs <= 0:
        problems.append(f"config.num_epochs={config.num_epochs!r}: must be > 0 (or set "
                        f"config.total_steps > 0)")
    for key in ("mesh.data", "mesh.fsdp"):
        if get(config, key) < 1 and get(config, key) != -1:
            problems.append(f"config.{key}={get(config, key)!r}: must be >= 1, or -1 (the "
                            f"remaining devices)")
    for key, allowed in _choices().items():
        if get(config, key) not in allowed:
            problems.append(f"config.{key}={get(config, key)!r}: expected one of "
                            f"{sorted(allowed)}")
    if any(s <= 0 for s in config.data.image_std):
        problems.append(f"config.data.image_std={tuple(config.data.image_std)}: must be > 0")
    for key in ("data.train", "data.eval"):
        if not get(config, key).strip():
            problems.append(f"config.{key} is empty: name a data source (e.g. "
                            f"'synthetic:shapes', a pairs.jsonl, 'tfds:coco_captions/test')")
    problems += _delegated_problems(config)
    return problems


def _delegated_problems(config) -> list[str]:
    """Checks the code already makes where it uses a value, run now with the key named."""
    from valign_jax import peft
    from valign_jax.evaluation.templates import templates_for
    from valign_jax.models import build
    checks = {"config.peft.overrides": lambda: peft.parse_overrides(config.peft.overrides),
              "config.eval.templates": lambda: templates_for(config.eval.templates, "")}
    for side in ("image", "text"):  # preset name, pooling, dtype: the tower config's own checks
        tower = config.model[side]
        local = bool(tower.checkpoint) and Path(tower.checkpoint).expanduser().is_dir()
        if tower.checkpoint and not local:
            continue  # a hub id's architecture is known only once it is fetched
        checks[f"config.model.{side}"] = functools.partial(  # a local config.json is cheap
            build.tower_config, tower, config.model, side, local)
    if config.data.get("augment"):
        from valign_jax.data import transforms
        checks["config.data.augment"] = lambda: transforms.train_transform(
            32, config.data.augment.to_dict() if hasattr(config.data.augment, "to_dict")
            else config.data.augment)
    problems = []
    for key, check in checks.items():
        try:
            check()
        except (ValueError, TypeError, KeyError, OSError) as err:
            message = str(err)
            problems.append(message if message.startswith(key) else f"{key}: {message}")
    return problems


# ---------------------------------------------------------------------------------------------
# Options that contradict each other


def combination_problems(config, mode: str = "train") -> list[str]:
    """Names not among the choices were reported already: checks needing them are skipped."""
    from valign_jax import losses, peft
    from valign_jax.evaluation.rerank import RERANK_SCORES
    problems = []
    objective, model = config.objective, config.model
    if objective.kind != "sigmoid":
        problems += [f"config.objective.{key}={objective[key]!r} applies to the sigmoid "
                     f"objective only; config.objective.kind is {objective.kind!r}"
                     for key, default in SIGMOID_ONLY.items() if objective[key] != default]
    if objective.itm_weight > 0 and not model.fusion_layers:
        problems.append("config.objective.itm_weight > 0 needs a model with fusion layers "
                        "(config.model.fusion_layers > 0; it is 0)")
    if objective.itm_weight > 0 and objective.kind == "clip_refine":
        problems.append("config.objective.itm_weight: the clip_refine objective has no "
                        "matching loss; set it to 0")
    logit = losses.LOGIT_SCALE_PRESETS.get(model.logit_preset)
    if model.logit_bias_init is not None and logit and logit.init_bias is None:
        problems.append(f"config.model.logit_bias_init={model.logit_bias_init!r}: the logit "
                        f"preset {model.logit_preset!r} (config.model.logit_preset) has no bias")
    if model.fusion_width and model.fusion_width % model.fusion_heads:
        problems.append(f"config.model.fusion_width={model.fusion_width} is not divisible by "
                        f"config.model.fusion_heads={model.fusion_heads}")
    recipe = peft.RECIPES.get(config.peft.recipe, peft.Recipe())
    for side in ("image", "text"):
        parts = getattr(recipe, side)
        for part, field in (("adapters", "adapter_dim"), ("deep", "deep_layers")):
            if part in parts and not model[side][field]:
                problems.append(
                    f"config.model.{side}.{field} is 0, but config.peft.recipe="
                    f"{config.peft.recipe!r} trains the {side} tower's {part}: set it > 0 or "
                    f"choose another recipe")
    return problems + _feature_cache_problems(config, recipe, mode)


def _feature_cache_problems(config, recipe, mode: str) -> list[str]:
    """Training from cached features never runs the towers: nothing in them can train."""
    cache = config.data.feature_cache
    if not cache:
        return ["config.data.feature_cache is empty: --mode=cache_features needs the directory "
                "the features go to"] if mode == "cache_features" else []
    problems = []
    trained = [side for side in ("image", "text") if getattr(recipe, side)]
    if trained:
        problems.append(f"config.data.feature_cache={cache!r} trains from cached tower outputs, "
                        f"but config.peft.recipe={config.peft.recipe!r} trains the "
                        f"{' and '.join(trained)} tower: choose a recipe with frozen towers "
                        f"(e.g. 'heads_only') or clear config.data.feature_cache")
    if config.model.fusion_layers:
        problems.append(f"config.data.feature_cache={cache!r} holds pooled features, but "
                        f"config.model.fusion_layers={config.model.fusion_layers} needs the "
                        f"towers' token outputs; clear one of them")
    if config.data.get("augment"):
        problems.append(f"config.data.augment has no effect with config.data.feature_cache="
                        f"{cache!r}: the features are computed once; remove one of them")
    return problems


def device_problems(config, devices) -> list[str]:
    """The mesh fits the devices and the global batch splits evenly over it."""
    from valign_jax import sharding
    try:
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp,
                                  None if devices is True else devices)
        sharding.check_batch_size(config.batch_size, mesh)
    except ValueError as err:
        return [str(err)]
    return []
