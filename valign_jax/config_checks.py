"""A whole config checked before any compute: unknown keys, wrong types, values out of range and
options that contradict each other. Every problem names its config key, and all of them are
reported at once.

    from valign_jax.config_checks import check_config
    check_config(config)        # ConfigError: "config.data.feature_cahce: unknown key; did you ..."

Keys, types, allowed values and ranges are the schema's (valign_jax/schema.py): a key added
there is known here. Each objective and evaluator checks its own options (their registries);
this module checks what concerns the run as a whole.

main.py checks a config before a dry run (devices=False: it describes the model, not this
machine) and before caching features; train.train_and_evaluate checks it first thing, so a bad
config fails in well under a second, before a workdir is made, a model built or a step compiled.
"""

from __future__ import annotations

import difflib
import functools
import math
import numbers
from pathlib import Path

from valign_jax import schema
from valign_jax.schema import EVAL_ENTRY, OPTIONAL, SCHEMA, Key


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem by config key."""


def check_config(config, *, devices=True, mode: str = "train") -> None:
    """Raise ConfigError naming every problem of `config` (and of its `pretrain` stage).

    devices: True checks the mesh and the batch against this machine's devices, a list against
    those, False skips it. mode: "train", or "cache_features" (needs data.feature_cache)."""
    problems = find_problems(config, devices=devices, mode=mode)
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError(f"invalid config ({len(problems)} problems):\n  "
                          + "\n  ".join(problems))


def find_problems(config, *, devices=True, mode: str = "train", _seen=()) -> list[str]:
    """check_config's problems as a list of messages (empty: the config can run)."""
    unknown, broken = [], []
    structure_problems(config, unknown, broken)
    if broken:  # the value checks below read keys that are missing or mistyped
        return unknown + broken
    problems = unknown + value_problems(config) + combination_problems(config, mode)
    if devices and not problems:
        problems += device_problems(config, devices)
    spec = config.get("pretrain", "")
    if spec and not problems and spec not in _seen:
        from valign_jax.recipes import load_config  # FileNotFoundError names a missing file
        try:
            stage = find_problems(load_config(spec), devices=devices, _seen=(*_seen, spec))
        except ValueError as err:  # e.g. an unknown config argument
            stage = [str(err)]
        problems += [f"config.pretrain={spec!r}: {p}" for p in stage]
    return problems


def get(config, dotted: str):
    return functools.reduce(lambda node, key: node[key], dotted.split("."), config)


# ---------------------------------------------------------------------------------------------
# Keys and types, against the schema


def _is_section(value) -> bool:
    return hasattr(value, "keys") and hasattr(value, "__getitem__")


def _sections(keys) -> dict[str, set]:
    """{section path: its key names} of dotted keys ("" is the top level)."""
    out: dict[str, set] = {}
    for dotted in keys:
        parts = dotted.split(".")
        for i, name in enumerate(parts):
            out.setdefault(".".join(parts[:i]), set()).add(name)
    return out


def structure_problems(config, unknown: list, broken: list) -> None:
    """Unknown keys into `unknown`, missing and mistyped ones into `broken`."""
    keys = {**SCHEMA, **schema.objective_options()}
    _walk(config, "", keys, _sections(keys), unknown, broken)
    evals = config.get("evals")
    if evals is None:
        broken.append("config.evals: missing (valign_jax.schema.base_config() has every key "
                      "with its default; build on it)")
    elif not _is_section(evals):
        broken.append(f"config.evals: expected a section of evaluator entries, got "
                      f"{_shown(evals)}")
    else:
        for name in evals.keys():
            eval_entry_problems(name, evals[name], unknown, broken)


def _walk(node, path: str, keys: dict, sections: dict, unknown: list, broken: list) -> None:
    known = sections.get(path, set())
    where = lambda key: f"config.{path + '.' if path else ''}{key}"
    for key in node.keys():
        dotted = f"{path}.{key}" if path else key
        value = node[key]
        if dotted == "evals":
            continue  # entries checked against the evaluator registry
        if key not in known:
            if dotted in OPTIONAL:
                if not _is_section(value):
                    broken.append(f"{where(key)}: expected a section of keys, got "
                                  f"{_shown(value)}")
                continue
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            unknown.append(f"{where(key)}: unknown key{hint} (valid keys of "
                           f"config{'.' + path if path else ''}: {sorted(known)})")
        elif dotted in sections:
            if _is_section(value):
                _walk(value, dotted, keys, sections, unknown, broken)
            else:
                broken.append(f"{where(key)}: expected a section of keys, got {_shown(value)}")
        else:
            problem = type_problem(value, keys[dotted])
            if problem:
                broken.append(f"{where(key)}: {problem}")
    required = [k for k in sorted(known) if f"{path}.{k}".lstrip(".") in SCHEMA
                or f"{path}.{k}".lstrip(".") in sections]  # registered options are optional
    broken += [f"{where(key)}: missing (valign_jax.schema.base_config() has every key with its "
               f"default; build on it)" for key in required if key not in node.keys()]


def eval_entry_problems(name, entry, unknown: list, broken: list) -> None:
    """What is wrong with config.evals.<name> (`entry`), before any model is built: appends
    unknown keys to `unknown` and other problems (each naming its key) to `broken`."""
    from valign_jax.evaluation import registry
    where = f"config.evals.{name}"
    if not _is_section(entry):
        broken.append(f"{where}: expected a section (type, every, data, options), got "
                      f"{_shown(entry)}")
        return
    kind = entry.get("type")
    try:
        options = registry.evaluator_type(str(kind)).options
    except ValueError as err:
        broken.append(f"{where}.type: {err}")
        return
    keys = {**EVAL_ENTRY, **{k: Key(v, "") for k, v in options.items()}}
    for key in entry.keys():
        if key not in keys:
            close = difflib.get_close_matches(str(key), sorted(keys), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            unknown.append(f"{where}.{key}: unknown key{hint} (an evaluator of type {kind!r} "
                           f"has {sorted(keys)})")
        else:
            problem = type_problem(entry[key], keys[key])
            if problem:
                broken.append(f"{where}.{key}: {problem}")
    broken += [f"{where}.{key}: missing (build entries with schema.eval_entry)"
               for key in EVAL_ENTRY if key not in entry]


def type_problem(value, key: Key) -> str | None:
    """Why `value` cannot be the value of `key`."""
    if key.also and isinstance(value, key.also):
        return None
    if value is None:  # only placeholders may be None
        return None if key.placeholder else f"expected {_name(key.type)}, got None"
    return _value_type_problem(value, key.type, key.default)


def _value_type_problem(value, expected: type, default) -> str | None:
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
            problem = _value_type_problem(item, type(item_default), item_default)
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


def _bounds_problem(value, key: Key) -> str | None:
    if value in key.special or not isinstance(value, numbers.Real):
        return None
    if not math.isfinite(value):
        return "must be a finite number"
    low_open, high_open = key.open in ("low", "both"), key.open in ("high", "both")
    too_low = key.low is not None and (value <= key.low if low_open else value < key.low)
    too_high = key.high is not None and (value >= key.high if high_open else value > key.high)
    if not (too_low or too_high):
        return None
    if key.high is None:
        bound = f"> {key.low}" if low_open else f">= {key.low}"
        return f"must be {bound}" + (f", or {' or '.join(map(str, key.special))}"
                                      if key.special else "")
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return f"must be in {left}{key.low}, {key.high}{right}"


def value_problems(config) -> list[str]:
    problems = []
    for dotted, key in SCHEMA.items():
        value = get(config, dotted)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"config.{dotted}={value!r}: must be a finite number")
            continue
        bounds = _bounds_problem(value, key)
        if bounds:
            problems.append(f"config.{dotted}={value!r}: {bounds}")
        allowed = key.allowed()
        if allowed is not None and value not in allowed:
            problems.append(f"config.{dotted}={value!r}: expected one of {sorted(allowed)}")
        if isinstance(value, (tuple, list)) and any(
                isinstance(v, float) and not math.isfinite(v) for v in value):
            problems.append(f"config.{dotted}={tuple(value)}: every item must be finite")
    if not config.total_steps and config.num_epochs <= 0:
        problems.append(f"config.num_epochs={config.num_epochs!r}: must be > 0 (or set "
                        f"config.total_steps > 0)")
    if any(s <= 0 for s in config.data.image_std):
        problems.append(f"config.data.image_std={tuple(config.data.image_std)}: must be > 0")
    tokenizer = config.data.tokenizer
    if tokenizer not in ("auto", "words", "learned") and not (
            Path(tokenizer).expanduser().is_dir() or tokenizer.count("/") == 1):
        problems.append(f"config.data.tokenizer={tokenizer!r}: expected 'auto', 'words', "
                        f"'learned', or a directory of tokenizer files (or a hub id)")
    from valign_jax.data.sources import spec_problem
    for key in ("data.train", "data.eval"):
        if not get(config, key).strip():
            problems.append(f"config.{key} is empty: name a data source (e.g. "
                            f"'synthetic:shapes', a pairs.jsonl, 'tfds:coco_captions/test')")
        elif spec_problem(get(config, key), f"config.{key}"):
            problems.append(spec_problem(get(config, key), f"config.{key}"))
    return problems + _delegated_problems(config)


def _delegated_problems(config) -> list[str]:
    """Checks the code already makes where it uses a value, run now with the key named."""
    from valign_jax import build, peft
    from valign_jax.evaluation.templates import templates_for
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
    """The chosen objective's, its auxiliary losses' and the evaluators' own checks, and the
    run-wide ones: heads and logit presets, PEFT parts the model lacks, feature caches."""
    from valign_jax import losses, objectives, peft
    from valign_jax.evaluation import registry
    problems = []
    objective, model = config.objective, config.model
    chosen = objectives.kinds().get(objective.kind)
    if chosen is None:  # reported with the choices already
        return problems
    active = [a for a in objectives.auxiliaries().values() if objective.get(a.weight_key, 0)]
    used = set(chosen.options) | {o for a in active for o in a.options}
    owners: dict[str, list] = {}  # an option the chosen objective lacks: who has it
    for kind in objectives.kinds().values():
        for option, default in kind.options.items():
            if option not in used and default is not None \
                    and objective.get(option, default) != default:
                owners.setdefault(option, []).append(kind.name)
    for option, names in owners.items():
        problems.append(f"config.objective.{option}={objective[option]!r} applies to the "
                        f"{' and '.join(names)} objective{'s' if len(names) > 1 else ''} only; "
                        f"config.objective.kind is {objective.kind!r}")
    for unit in [chosen, *active]:
        if unit.check is not None:
            problems += unit.check(config)
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
    for name, entry in config.evals.items():
        kind = registry.evaluator_type(entry.type)
        if kind.check is not None:
            problems += kind.check(config, entry, f"config.evals.{name}")
    return (problems + _micro_batch_problems(config, chosen, active)
            + _feature_cache_problems(config, recipe, mode))


def _micro_batch_problems(config, chosen, active) -> list[str]:
    """Gradient caching computes the objective from the model's outputs cached per
    micro-batch: an objective that calls the model inside its loss (needs "model") cannot be
    served. Which of the chosen objective and its auxiliary losses asks for the model is read
    from their `needs`, not their names."""
    k, objective = config.micro_batches, config.objective
    if k <= 1:  # 1: the whole batch at once; below 1: the range check names it
        return []
    problems = []
    try:
        built = chosen.build(objective, None)
        culprits = [f"config.objective.kind={objective.kind!r}"] if "model" in built.needs \
            else []
        for aux in active:
            wrapped = aux.wrap(built, objective)
            if "model" in wrapped.needs - built.needs:
                culprits.append(f"config.objective.{aux.weight_key}="
                                f"{objective[aux.weight_key]!r} ({aux.help})")
            built = wrapped
    except (ValueError, KeyError, TypeError):  # the objective's own checks report it
        return []
    if culprits:
        problems.append(f"config.micro_batches={k} computes the loss from the towers' outputs "
                        f"cached per micro-batch, but {' and '.join(culprits)} runs the model "
                        f"inside the loss; set config.micro_batches=1 or choose another "
                        f"objective")
    if config.batch_size % k:
        problems.append(f"config.batch_size={config.batch_size} does not split into "
                        f"config.micro_batches={k} equal micro-batches")
    return problems


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
    k, parallel = config.micro_batches, sharding.data_parallel_size(mesh)
    if (config.batch_size // parallel) % k:
        return [f"config.batch_size={config.batch_size} gives each of the {parallel} "
                f"data-parallel devices (mesh data={mesh.shape['data']} × fsdp="
                f"{mesh.shape['fsdp']}) {config.batch_size // parallel} rows, which do not split "
                f"into config.micro_batches={k} micro-batches; choose a batch size that is a "
                f"multiple of {parallel * k}"]
    return []


__all__ = ["ConfigError", "check_config", "find_problems", "schema"]
