"""The config schema: every key a run config may have, its default, type, allowed values and a
line of help. `base_config()` builds the defaults every recipe starts from; the config checks
(config_checks.py) read the same table, so a key added here is known everywhere.

    from valign_jax import schema
    c = schema.base_config()          # an ml_collections ConfigDict of every key
    schema.describe("objective")      # the keys under config.objective, with their help

Allowed values that the code defines (objective kinds, PEFT recipes, logit presets, evaluator
types, heads, ...) are read from where the code keeps them, when a config is checked.
`config.evals` holds one entry per evaluator (type, schedule, data, the type's own options),
checked against the evaluator registry (evaluation/registry.py).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import ml_collections


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key. `kind`: the value's type (default: the default's). `choices`: allowed
    values, or a function returning them. `low` / `high`: bounds, inclusive unless `open`
    names the side ("low", "high", "both"); `special`: values allowed outside the bounds.
    `also`: other accepted types. `placeholder`: None by default, set from the command line."""

    default: Any
    help: str
    kind: type | None = None
    choices: tuple | Callable[[], Any] | None = None
    low: float | None = None
    high: float | None = None
    open: str = ""
    special: tuple = ()
    also: tuple = ()
    placeholder: bool = False

    @property
    def type(self) -> type:
        return self.kind or type(self.default)

    def allowed(self):
        return self.choices() if callable(self.choices) else self.choices


def _names(module: str, attribute: str):
    """Allowed values the code keeps (a name table, or a function returning one), read from
    `module.attribute` when a config is checked."""
    def allowed():
        value = getattr(importlib.import_module(f"valign_jax.{module}"), attribute)
        return tuple(value() if callable(value) else value)
    return allowed


AT_LEAST_0, AT_LEAST_1 = dict(low=0), dict(low=1)

# Per tower (config.model.image and config.model.text).
TOWER = {
    "preset": Key("", "architecture preset (the family's shapes; a checkpoint's "
                  "config.json overrides it)",
                  choices=_names("models.registry", "preset_names")),
    "checkpoint": Key("", "hub id or local directory of pretrained weights (\"\": none)"),
    "pooling": Key("", "how the tower pools its tokens (\"\": the family's default)"),
    "adapter_dim": Key(0, "LiLT layerwise adapters' bottleneck width (0: none)", **AT_LEAST_0),
    "deep_layers": Key(0, "LiLT deep-adapter layers appended on top (0: none)", **AT_LEAST_0),
    "image_size": Key(0, "image towers: input side in pixels (0: the checkpoint's; else "
                      "positions are resized)", **AT_LEAST_0),
    "max_length": Key(64, "text towers: tokens per caption", low=2),
}

SCHEMA: dict[str, Key] = {
    "seed": Key(0, "seed of the parameter init and the run's randomness"),
    "variant": Key("", "the recipe variant this config was made as (informational)"),
    "pretrain": Key("", "a config string trained first into <workdir>/pretrain; this run then "
                    "starts from its result"),
    "batch_size": Key(512, "global batch: the losses see negatives from every device",
                      **AT_LEAST_1),
    "micro_batches": Key(1, "gradient caching: run the towers over the batch in this many "
                         "chunks, one chunk's activations at a time; the loss, gradients and "
                         "update stay the whole batch's", **AT_LEAST_1),
    "num_epochs": Key(1.0, "epochs over config.data.train (unless total_steps > 0)"),
    "total_steps": Key(0, "training steps; > 0 overrides num_epochs", **AT_LEAST_0),
    "log_every": Key(50, "steps between training-metric logs", **AT_LEAST_1),
    "eval_every": Key(1000, "steps between evaluations (an evaluator's `every` may differ)",
                      **AT_LEAST_1),
    "checkpoint_every": Key(1000, "steps between checkpoints", **AT_LEAST_1),
    "keep_checkpoints": Key(3, "checkpoints kept on disk", **AT_LEAST_1),
    "on_nonfinite": Key("stop", "a non-finite loss or gradient: 'stop' naming the step, or "
                        "'skip' its update", choices=("stop", "skip")),
    # device mesh
    "mesh.data": Key(-1, "data-parallel devices (-1: the remaining devices)", low=1,
                     special=(-1,)),
    "mesh.fsdp": Key(1, "devices that also split large parameters (-1: the remaining)", low=1,
                     special=(-1,)),
    "mesh.min_fsdp_size": Key(2 ** 14, "arrays smaller than this stay replicated on fsdp",
                              **AT_LEAST_1),
    # objective
    "objective.kind": Key("softmax", "the objective (valign_jax/objectives)",
                          choices=_names("objectives", "kinds")),
    "objective.norm": Key("batch", "sigmoid: 'batch' (SigLIP, sum / B) or 'pairs' (SAIL, / B²)",
                          choices=_names("objectives.sigmoid", "NORMS")),
    "objective.multi_positive": Key(False, "sigmoid: each image's long caption is a second "
                                    "positive (SAIL)"),
    "objective.chunked": Key(False, "softmax and sigmoid: the loss and its metrics computed "
                             "around a ring of devices, none holding all B×B logits"),
    "objective.itm_weight": Key(0.0, "fusion models: + this weight × image-text matching on "
                                "hard negatives", **AT_LEAST_0),
    "objective.itm_negatives": Key(1, "hard negatives drawn per image and per caption for "
                                   "that loss", **AT_LEAST_1),
    "objective.clip_refine.weights": Key((0.0, 1.0, 1.0), "λ of (CLIP, RaFA, HyCD)"),
    "objective.clip_refine.prior_std": Key(1.0, "RaFA's references r ~ N(0, prior_std² I)",
                                           low=0, open="low"),
    "objective.clip_refine.rafa_form": Key("official", "'official' (mean over i, d) or "
                                           "'paper' (= official × D/2)",
                                           choices=_names("objectives.clip_refine",
                                                          "RAFA_FORMS")),
    "objective.clip_refine.alpha": Key(0.5, "HyCD's weight of the identity in its target",
                                       low=0, high=1),
    "objective.clip_refine.temperature": Key(1.0, "HyCD's distillation temperature", low=0,
                                             open="low"),
    "objective.clip_refine.hycd_features": Key("raw", "HyCD on 'raw' (official code) or "
                                               "'normalized' features",
                                               choices=_names("objectives.clip_refine",
                                                              "HYCD_FEATURES")),
    # data
    "data.train": Key("tfds:coco_captions/train", "training pairs: tfds:<name>/<split>, a "
                      "pairs.jsonl / .csv, tar shards or synthetic:<name>"),
    "data.eval": Key("tfds:coco_captions/test", "held-out pairs for retrieval and geometry"),
    "data.num_train": Key(50_000, "synthetic sources only: training examples", **AT_LEAST_1),
    "data.num_eval": Key(512, "synthetic sources only: evaluation examples", **AT_LEAST_1),
    "data.feature_cache": Key("", "a directory: train from cached frozen-tower features (SAIL; "
                              "relative paths are inside the workdir)"),
    "data.seed": Key(0, "seed of the synthetic data"),
    "data.image_mean": Key((0.5, 0.5, 0.5), "per-channel mean (pixels in [0, 1]); a "
                           "checkpoint's preprocessor_config.json wins"),
    "data.image_std": Key((0.5, 0.5, 0.5), "per-channel std, > 0"),
    "data.normalize_on_device": Key(True, "training batches go to the devices as uint8 pixels "
                                    "and are normalised there (a quarter of the bytes, no "
                                    "float work on the host; the same values bit for bit)"),
    "data.lower_case": Key(False, "lower-case captions before tokenizing"),
    "data.tokenizer": Key("auto", "text towers without a checkpoint: 'learned' (a vocabulary "
                          "learned from the training captions, kept in the workdir), 'words' "
                          "(the embedded data's word list), 'auto' (words for synthetic data, "
                          "else learned), or a directory of tokenizer files"),
    "data.threads": Key(2, "grain threads reading and decoding records", **AT_LEAST_0),
    "data.workers": Key(0, "grain worker processes (0: threads only)", **AT_LEAST_0),
    # evaluation settings shared by the evaluators (config.evals)
    "eval.zeroshot": Key("", "zero-shot datasets, comma-separated (tfds classification data, "
                         "class folders, synthetic:shapes)"),
    "eval.zeroshot_limit": Key(0, "evaluate on their first N usable images (0: all)",
                               **AT_LEAST_0),
    "eval.templates": Key("auto", "zero-shot prompts: auto | single | clip80 | clip7, or a "
                          "list of templates", also=(list, tuple)),
    "eval.class_names": Key("", "per zero-shot dataset, a file of class names (one per line), "
                            "comma-separated"),
    "eval.rerank_k": Key(10, "fusion models: re-rank the dual encoder's top k", **AT_LEAST_1),
    "eval.rerank_score": Key("itm+contrastive", "re-ranking score: match head + dual logit, or "
                             "'itm' (the head alone)",
                             choices=_names("evaluation.rerank", "RERANK_SCORES")),
    "eval.batch_size": Key(256, "examples per evaluation batch", **AT_LEAST_1),
    # model
    **{f"model.{side}.{k}": v for side in ("image", "text") for k, v in TOWER.items()},
    "model.projection_dim": Key(256, "width of the shared embedding space", **AT_LEAST_1),
    "model.image_head": Key("linear", "head on the image tower",
                            choices=_names("models.layers", "HEADS")),
    "model.text_head": Key("linear", "head on the text tower",
                           choices=_names("models.layers", "HEADS")),
    "model.head_bias": Key(False, "linear heads with a bias"),
    "model.logit_preset": Key("clip", "init and clamp of the logit scale (and bias)",
                              choices=_names("losses", "LOGIT_SCALE_PRESETS")),
    "model.adapter_init": Key("normal", "adapters start N(0, 0.02) or as the 'identity'",
                              choices=("normal", "identity")),
    "model.dtype": Key("float32", "compute dtype; parameters stay float32",
                       choices=_names("models.config", "DTYPES")),
    "model.scan_layers": Key(False, "nn.scan over each tower's layers (faster compiles)"),
    "model.remat": Key("none", "recompute layer activations in the backward pass",
                       choices=_names("models.layers", "REMAT_POLICIES")),
    "model.attention_impl": Key("auto", "'auto': the fused cuDNN kernel on NVIDIA GPUs in "
                                "bf16/fp16, XLA's elsewhere; or 'xla' / 'cudnn'",
                                choices=("auto", "xla", "cudnn")),
    "model.init_from": Key("", "a full CLIP checkpoint or a previous run's workdir to start "
                           "from"),
    "model.logit_scale_init": Key(None, "initial log logit scale (None: the preset's)",
                                  kind=float, placeholder=True),
    "model.logit_bias_init": Key(None, "initial logit bias of sigmoid recipes (None: the "
                                 "preset's)", kind=float, placeholder=True),
    "model.fusion_layers": Key(0, "> 0: cross-modal interaction layers + a match head",
                               **AT_LEAST_0),
    "model.fusion_heads": Key(4, "attention heads of the fusion layers", **AT_LEAST_1),
    "model.fusion_width": Key(0, "fusion width (0: the text tower's)", **AT_LEAST_0),
    # which parameters train
    "peft.recipe": Key("full", "which parameters train (peft.RECIPES)",
                       choices=_names("peft", "RECIPES")),
    "peft.overrides": Key((), "('<regex>=trainable|frozen', ...) over the recipe"),
    # optimizer
    "optim.name": Key("adamw", "the optimizer", choices=("adamw", "lion", "sgd")),
    "optim.lr": Key(1e-4, "peak learning rate", **AT_LEAST_0),
    "optim.warmup_init_lr": Key(1e-5, "learning rate at step 0", **AT_LEAST_0),
    "optim.end_lr": Key(1e-5, "learning rate at the end of the cosine", **AT_LEAST_0),
    "optim.warmup_steps": Key(1000, "linear warm-up steps", **AT_LEAST_0),
    "optim.warmup_fraction": Key(0.0, "> 0: the warm-up lasts this fraction of the run", low=0,
                                 high=1, open="high"),
    "optim.b1": Key(0.9, "first-moment decay (SGD: momentum)", low=0, high=1, open="high"),
    "optim.b2": Key(0.999, "second-moment decay", low=0, high=1, open="high"),
    "optim.eps": Key(1e-8, "Adam's epsilon", low=0, open="low"),
    "optim.weight_decay": Key(0.02, "decoupled weight decay (kernels and embeddings only)",
                              **AT_LEAST_0),
    "optim.grad_clip_norm": Key(0.0, "clip the gradient's global norm (0: off)", **AT_LEAST_0),
}

# Keys a config may add to the schema: data.augment holds TrainTransform's fields.
OPTIONAL = {"data.augment": dict}

# One entry of config.evals: these keys, plus the evaluator type's own options.
EVAL_ENTRY = {
    "type": Key("", "the evaluator type (evaluation/registry.py)"),
    "every": Key(0, "steps between its runs (0: config.eval_every); every evaluator also "
                 "runs at step 0 and at the end", **AT_LEAST_0),
    "data": Key("", "its data source (\"\": the type's default)"),
}
DEFAULT_EVALS = {"retrieval": "retrieval", "zeroshot": "zeroshot"}  # name: type


def _nested(flat: dict[str, Any]) -> ml_collections.ConfigDict:
    root: dict = {}
    for dotted, value in flat.items():
        *sections, leaf = dotted.split(".")
        node = root
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = value
    return ml_collections.ConfigDict(root)


def default_value(key: Key):
    if key.placeholder:
        return ml_collections.config_dict.placeholder(key.type)
    return key.default


def tower(preset: str, checkpoint: str = "", **fields) -> ml_collections.ConfigDict:
    """One `config.model.image|text` entry: an architecture preset, optionally a checkpoint
    (hub id or local directory; its config.json then decides the architecture), and
    overrides of the other tower keys."""
    unknown = set(fields) - set(TOWER)
    if unknown:
        raise ValueError(f"unknown tower fields {sorted(unknown)}; known: {sorted(TOWER)}")
    values = {k: key.default for k, key in TOWER.items()}
    return ml_collections.ConfigDict({**values, "preset": preset, "checkpoint": checkpoint,
                                      **fields})


def eval_entry(kind: str, every: int = 0, data: str = "", **options) -> ml_collections.ConfigDict:
    """One `config.evals.<name>` entry; the type's other options keep their defaults."""
    from valign_jax.evaluation import registry
    defaults = dict(registry.evaluator_type(kind).options)
    unknown = set(options) - set(defaults)
    if unknown:
        raise ValueError(f"evaluator type {kind!r} has no options {sorted(unknown)}; its "
                         f"options: {sorted(defaults)}")
    return ml_collections.ConfigDict({"type": kind, "every": every, "data": data,
                                      **defaults, **options})


def objective_options() -> dict[str, Key]:
    """`config.objective` keys that registered objectives declare beyond SCHEMA's (an objective
    a user registers brings its own options)."""
    from valign_jax import objectives
    units = [*objectives.kinds().values(), *objectives.auxiliaries().values()]
    return {f"objective.{option}": Key(default, f"an option of the {unit.name} objective")
            for unit in units for option, default in unit.options.items()
            if default is not None and f"objective.{option}" not in SCHEMA}


def base_config() -> ml_collections.ConfigDict:
    """Every key of SCHEMA at its default (and the options of registered objectives), and the
    default evaluators."""
    config = _nested({k: default_value(key) for k, key in SCHEMA.items()
                      if not k.startswith("model.image.") and not k.startswith("model.text.")})
    for dotted, key in objective_options().items():
        config.objective[dotted.split(".", 1)[1]] = key.default
    config.model.image = tower("vit_b16")
    config.model.text = tower("bert_base")
    config.evals = ml_collections.ConfigDict({name: eval_entry(kind)
                                              for name, kind in DEFAULT_EVALS.items()})
    return config


def describe(prefix: str = "") -> str:
    """The keys under `prefix` (e.g. "objective"), one line each: name, default, help."""
    rows = [(k, key) for k, key in SCHEMA.items() if k.startswith(prefix)]
    width = max((len(k) for k, _ in rows), default=0) + 2
    return "\n".join(f"config.{k:<{width}}{key.default!r:<28} {key.help}" for k, key in rows)
