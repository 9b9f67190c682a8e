"""The tower-family registry: everything the rest of valign_jax knows about a kind of tower.

A family is one module (models/bert.py, models/vit.py, ...) that defines a config dataclass and a
Flax module, and registers them once with what the other layers need:

    register(TowerFamily(
        config=BertConfig, module=BertTower, modality="text",
        hf_class="BertModel", weight_prefixes=("", "bert"),    # Hugging Face mapping
        norm_names=("LayerNorm",),                             # its LayerNorms (peft "ln")
        presets={"bert_base": lambda: BertConfig(...)},        # architectures by name
    ))

The family's name is its config's `model_type` (Hugging Face's). hf.py loads and saves through
the registry, peft.py reads the LayerNorm names from it, configs name its presets, and
`tower_for(config)` builds its module. A new family (a test's toy one included) needs nothing
else: see docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import jax.numpy as jnp

from valign_jax.models.config import TowerConfig

MODALITIES = ("image", "text")


def _text_inputs(config, batch: int) -> dict:
    ids = jnp.ones((batch, 8), jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}


def _image_inputs(config, batch: int) -> dict:
    side = config.image_size
    return {"pixel_values": jnp.zeros((batch, side, side, config.num_channels), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class TowerFamily:
    """One kind of tower and how the rest of the package treats it.

    config / module: the TowerConfig subclass and the Flax module built from it.
    modality: "image" or "text" (None: the config's own `modality` field says, as for
        precomputed features, which can stand for either tower).
    hf_class: the transformers class name written into a saved config.json's `architectures`.
    weight_prefixes: where the tower's weights sit in a checkpoint's flat keys, tried in order
        ("" for a bare BertModel, "bert" inside BertForMaskedLM, ...).
    composite: (model_type, part) when the tower is also one half of a two-tower checkpoint,
        e.g. ("clip", "text"): a CLIP checkpoint's `text_config` describes it.
    norm_names: regexes of the tower's LayerNorm module names: LN-only tuning and the LN-shift
        analysis find them by these.
    deep_norms: the LayerNorms after the encoder, which train with the deep adapter (it feeds
        them a new layer's output).
    presets: architectures by name, so configs and dry runs build models without weights.
    dummy_inputs: (config, batch) -> keyword inputs of the right shapes to trace the module.
    position_table: the path (suffix) of a position-embedding table stored for one image size,
        which loading resizes to the configured size; position_prefix_tokens: how many rows
        ahead of the patch grid it holds ([CLS]: 1), kept as they are.
    head_names: the tower's own output heads (module names), when the tower itself maps its
        features into the shared space (SigLIP's attention-pooling and text heads): the PEFT
        recipes train them as "heads", like a dual encoder's projections.
    pads_to_max_positions: a text tower trained on captions padded to max_position_embeddings
        (SigLIP pools the last position): its tokenizer must pad to exactly that length.
    """

    config: type
    module: type
    modality: str | None
    hf_class: str = ""
    weight_prefixes: tuple[str, ...] = ("",)
    composite: tuple[str, str] | None = None
    norm_names: tuple[str, ...] = ()
    deep_norms: tuple[str, ...] = ()
    presets: Mapping[str, Callable[[], TowerConfig]] = dataclasses.field(default_factory=dict)
    dummy_inputs: Callable[[TowerConfig, int], dict] | None = None
    position_table: str = ""
    position_prefix_tokens: int = 1
    head_names: tuple[str, ...] = ()
    pads_to_max_positions: bool = False

    @property
    def name(self) -> str:
        return self.config.model_type or self.config.__name__

    def inputs(self, config, batch: int = 1) -> dict:
        if self.dummy_inputs is not None:
            return self.dummy_inputs(config, batch)
        return (_text_inputs if modality(config) == "text" else _image_inputs)(config, batch)


_FAMILIES: dict[str, TowerFamily] = {}        # by name (model_type)
_BY_CONFIG: dict[type, TowerFamily] = {}      # by config class


def register(family: TowerFamily) -> TowerFamily:
    """Add a family; its presets join the preset names. Re-registering the same config class
    replaces it (a module reloaded in a notebook)."""
    if family.modality not in MODALITIES + (None,):
        raise ValueError(f"{family.name}: modality={family.modality!r}; expected one of "
                         f"{MODALITIES} or None")
    for name in family.presets:
        owner = preset_owner(name)
        if owner is not None and owner.config is not family.config:
            raise ValueError(f"preset {name!r} of {family.name} is already a preset of "
                             f"{owner.name}")
    old = _FAMILIES.get(family.name)
    if old is not None and old.config.__name__ != family.config.__name__:
        raise ValueError(f"model_type {family.name!r} is registered already (by "
                         f"{old.config.__name__})")
    _BY_CONFIG.pop(getattr(old, "config", None), None)
    _FAMILIES[family.name] = family
    _BY_CONFIG[family.config] = family
    return family


def families() -> tuple[TowerFamily, ...]:
    return tuple(_FAMILIES.values())


def family(name: str) -> TowerFamily:
    """The family registered for `name` (its config's model_type)."""
    if name not in _FAMILIES:
        raise ValueError(f"model_type={name!r} is not supported; valign_jax knows "
                         f"{sorted(_FAMILIES) + sorted(composite_types())}")
    return _FAMILIES[name]


def family_of(config) -> TowerFamily:
    """The family of a tower config (its exact class, else its nearest registered base)."""
    for cls in type(config).__mro__:
        if cls in _BY_CONFIG:
            return _BY_CONFIG[cls]
    raise TypeError(f"no tower family for config type {type(config).__name__}; known: "
                    f"{sorted(c.__name__ for c in _BY_CONFIG)}")


def config_class(name: str) -> type:
    """A registered config class by its class name (model.json records it so)."""
    for cls in _BY_CONFIG:
        if cls.__name__ == name:
            return cls
    raise ValueError(f"unknown tower type {name!r}; known: "
                     f"{sorted(c.__name__ for c in _BY_CONFIG)}")


def composite_types() -> dict[str, dict[str, TowerFamily]]:
    """{model_type: {part: family}} of the two-tower checkpoint types (e.g. "clip")."""
    out: dict[str, dict[str, TowerFamily]] = {}
    for fam in _FAMILIES.values():
        if fam.composite:
            kind, part = fam.composite
            out.setdefault(kind, {})[part] = fam
    return out


def tower_for(config, **module_kwargs):
    """The Flax tower module for a tower config."""
    return family_of(config).module(config, **module_kwargs)


def modality(config) -> str:
    fam = family_of(config)
    return fam.modality or config.modality


def is_text(config) -> bool:
    return modality(config) == "text"


def dummy_inputs(config, batch: int = 1) -> dict:
    """Keyword inputs of the right shapes to trace a tower (values are irrelevant)."""
    return family_of(config).inputs(config, batch)


# ---------------------------------------------------------------------------------------------
# Presets and norm names across families


def preset_owner(name: str) -> TowerFamily | None:
    for fam in _FAMILIES.values():
        if name in fam.presets:
            return fam
    return None


def preset_names() -> list[str]:
    return sorted(n for fam in _FAMILIES.values() for n in fam.presets)


def preset(name: str, **overrides):
    """A tower config by preset name, with fields replaced by `overrides`."""
    owner = preset_owner(name)
    if owner is None:
        raise ValueError(f"unknown architecture preset {name!r}; known: {preset_names()}")
    return owner.presets[name]().replace(**overrides)


def norm_pattern() -> str:
    """One regex alternative of every registered family's LayerNorm names."""
    names = sorted({n for fam in _FAMILIES.values() for n in fam.norm_names})
    return "(" + "|".join(names) + ")" if names else "(?!)"


def position_tables(config=None) -> dict[str, int]:
    """{parameter path suffix: rows ahead of the patch grid} of the position table of
    `config`'s family (every family's when None; families may share a suffix with different
    prefix rows, as CLIP's and SigLIP's do, so loaders ask for their tower's own)."""
    fams = _FAMILIES.values() if config is None else (family_of(config),)
    return {fam.position_table: fam.position_prefix_tokens for fam in fams
            if fam.position_table}


def head_pattern() -> str:
    """One regex alternative of every family's in-tower head names."""
    names = sorted({re.escape(n) for fam in _FAMILIES.values() for n in fam.head_names})
    return "(" + "|".join(names) + ")" if names else "(?!)"


def deep_norm_pattern() -> str:
    names = sorted({re.escape(n) for fam in _FAMILIES.values() for n in fam.deep_norms})
    return "(" + "|".join(names) + ")" if names else "(?!)"


# ---------------------------------------------------------------------------------------------
# Two-tower checkpoint types


@dataclasses.dataclass(frozen=True)
class DualCheckpoint:
    """A two-tower checkpoint type (HF's CLIPModel, SiglipModel, ...) read as a DualEncoder.
    Its towers are the families registered with `composite=(model_type, "vision" | "text")`;
    this says what sits around them.

    heads: the DualEncoder's image_head and text_head: "linear" (CLIP's bias-free
        `visual_projection` / `text_projection`) or "identity" (SigLIP: the towers' own heads
        already give the embeddings, and the DualEncoder adds nothing).
    settings: (config.json dict, image tower config, text tower config) -> the DualEncoder's
        other fields (projection_dim, logit_scale_init, logit_bias_init).
    config_fields: DualEncoder -> the config.json keys beyond model_type, architectures and
        the two towers' configs.
    logit_bias: the checkpoint holds a learned `logit_bias` (sigmoid models).
    logit_shape: the shape the checkpoint stores logit_scale (and logit_bias) with: CLIPModel
        a 0-d tensor, SiglipModel shape (1,). The DualEncoder's are 0-d.
    """

    model_type: str
    hf_class: str
    heads: str
    settings: Callable[[dict, TowerConfig, TowerConfig], dict]
    config_fields: Callable[[object], dict] = lambda model: {}
    logit_bias: bool = False
    logit_shape: tuple[int, ...] = ()

    def parts(self) -> dict[str, TowerFamily]:
        """{"vision": family, "text": family} of its towers."""
        parts = composite_types().get(self.model_type, {})
        if set(parts) != {"vision", "text"}:
            raise ValueError(f"two-tower type {self.model_type!r} needs a 'vision' and a "
                             f"'text' family registered with composite=({self.model_type!r}, "
                             f"part); found {sorted(parts)}")
        return parts


_DUAL: dict[str, DualCheckpoint] = {}


def register_dual(kind: DualCheckpoint) -> DualCheckpoint:
    _DUAL[kind.model_type] = kind
    return kind


def dual_checkpoint(model_type: str, source: str = "config.json") -> DualCheckpoint:
    """The two-tower checkpoint type of a config.json's model_type."""
    if model_type not in _DUAL:
        raise ValueError(f"{source}: hf.load_dual_encoder reads two-tower checkpoints "
                         f"(model_type {sorted(_DUAL)}), not model_type={model_type!r}; load "
                         f"single towers with hf.load_tower")
    return _DUAL[model_type]


def dual_checkpoint_of(image_config, text_config) -> DualCheckpoint | None:
    """The two-tower type whose vision and text families these tower configs belong to."""
    for kind in _DUAL.values():
        parts = composite_types().get(kind.model_type, {})
        if (parts.get("vision") is family_of(image_config)
                and parts.get("text") is family_of(text_config)):
            return kind
    return None
