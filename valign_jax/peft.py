"""Which parameters train: named recipes -> label trees ("trainable" / "frozen"), plus the
parameter report printed at the start of every run.

A recipe says, per tower, which parts unlock:
  all       every parameter of the tower
  ln        every LayerNorm scale and bias (LiLT's LN unlocking)
  bias      every bias, LayerNorm biases included (BitFit)
  adapters  the layerwise (Houlsby) adapters
  deep      the deep-adapter layers on top of the tower, with the ViT's final norm
  head      the tower's own output head, for families that have one (SigLIP's
            attention-pooling head and text head)
and whether the heads and the logit scale/bias train. The heads are what maps each tower's
features into the shared space: the dual encoder's projections, and the towers' own heads
where a family declares them (SigLIP: its dual encoder's projections are the identity). Regex rules given as
`overrides` ("<regex>=trainable|frozen", matched against 'vision_model/encoder/...' paths) win
over the recipe. A part or rule that matches no parameter is an error: it means the recipe and the
model disagree (e.g. LwA on a model built without adapters).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import numpy as np
from flax import traverse_util

from valign_jax.models import registry

TRAINABLE, FROZEN = "trainable", "frozen"
TOWER_PREFIX = {"image": "vision_model", "text": "text_model"}



def norm_names() -> str:
    """A regex alternative of the LayerNorm module names of every registered tower family
    (BERT's LayerNorm, ViT's layernorm_before/after, CLIP's layer_norm1/2, DINOv2's norm1/2,
    ...): the families declare them (models/registry.py)."""
    return registry.norm_pattern()


def part_patterns() -> dict[str, str]:
    """Each part's regex over 'vision_model/...' / 'text_model/...' paths ({t}: the tower)."""
    return {
        "all": r"^{t}/",
        "ln": r"^{t}/(.*/)?" + norm_names() + r"/(scale|bias)$",
        "bias": r"^{t}/.*bias$",
        "adapters": r"^{t}/.*/adapter[^/]*/",
        # the final norm after the encoder belongs to the deep adapter: it now normalises the
        # new layer's output
        "deep": r"^{t}/(deep_adapter/|" + registry.deep_norm_pattern() + r"/)",
        "head": r"^{t}/" + registry.head_pattern() + "/",
    }


def heads_pattern() -> str:
    """The heads: projections, the fusion re-ranker's interaction layers (new, never
    pretrained), and the towers' own heads (registered families' `head_names`)."""
    return (r"^(visual_projection|text_projection|fusion)(/|$)|^(vision_model|text_model)/"
            + registry.head_pattern() + "/")


LOGIT_PATTERN = r"^logit_(scale|bias)$"


@dataclasses.dataclass(frozen=True)
class Recipe:
    image: tuple[str, ...] = ()
    text: tuple[str, ...] = ()
    heads: bool = True
    logit: bool = True


RECIPES = {
    "full": Recipe(("all",), ("all",)),
    "frozen": Recipe(heads=False, logit=False),
    "ln_only": Recipe(("ln",), ("ln",), heads=False),
    "projection": Recipe(),
    "lilt_ln": Recipe(("ln",), ("ln",)),
    "lilt_bitfit": Recipe(("bias",), ("bias",)),
    "lilt_da_noln": Recipe(("deep",), ("deep",)),
    "lilt_da": Recipe(("deep", "ln"), ("deep", "ln")),
    "lilt_lwa_noln": Recipe(("adapters",), ("adapters",)),
    "lilt_lwa": Recipe(("adapters", "ln"), ("adapters", "ln")),
    "lilt_lwa_bitfit": Recipe(("adapters", "bias"), ("adapters", "bias")),
    "lilt_da_bitfit": Recipe(("deep", "bias"), ("deep", "bias")),
    "lit": Recipe((), ("all",)),                       # image tower locked
    "lit_reversed": Recipe(("all",), ()),              # text tower locked
    "lit_da": Recipe(("deep", "ln"), ("all",)),
    "lit_lwa": Recipe(("adapters", "ln"), ("all",)),
    "heads_only": Recipe(),                            # SAIL: frozen towers, alignment layers
}


def recipe_rules(recipe: Recipe | str) -> list[tuple[str, str, str]]:
    """(regex, label, what it stands for) rules of a recipe, most specific first."""
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
        recipe = RECIPES[recipe]
    rules, patterns = [], part_patterns()
    for tower in ("image", "text"):
        for part in getattr(recipe, tower):
            if part not in patterns:
                raise ValueError(f"unknown part {part!r} for the {tower} tower; known: "
                                 f"{sorted(patterns)}")
            rules.append((patterns[part].format(t=TOWER_PREFIX[tower]), TRAINABLE,
                          f"{tower}:{part}"))
    if recipe.heads:
        rules.append((heads_pattern(), TRAINABLE, "heads"))
    if recipe.logit:
        rules.append((LOGIT_PATTERN, TRAINABLE, "logit"))
    return rules


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, str, str]]:
    """["<regex>=trainable", ...] -> rules; bad syntax names the offending entry."""
    rules = []
    for entry in overrides:
        regex, sep, label = str(entry).rpartition("=")
        if not sep or label not in (TRAINABLE, FROZEN):
            raise ValueError(f"override {entry!r}: expected '<regex>=trainable' or '<regex>=frozen'")
        re.compile(regex)
        rules.append((regex, label, f"override {entry!r}"))
    return rules


def make_labels(params, recipe: Recipe | str, overrides: Iterable[str] = (),
                default: str | None = FROZEN):
    """A label tree of `params`' structure. Overrides win over the recipe; a parameter no rule
    matches gets `default` (None: such a parameter is an error naming its path)."""
    rules = parse_overrides(overrides) + recipe_rules(recipe)
    compiled = [(re.compile(regex), label, what) for regex, label, what in rules]

    def label_of(path, _):
        name = "/".join(path)
        for regex, label, _what in compiled:
            if regex.search(name):
                return label
        if default is None:
            raise ValueError(f"parameter '{name}' is matched by no rule of the recipe and there "
                             "is no default label")
        return default

    labels = traverse_util.path_aware_map(label_of, _as_dict(params))
    # A rule that matches nothing means the recipe and the model disagree. (A recipe rule that
    # an override shadows still matches: that is the override doing its job.)
    names = ["/".join(p) for p in traverse_util.flatten_dict(_as_dict(params))]
    unused = [(what, regex.pattern) for regex, _, what in compiled
              if not any(regex.search(n) for n in names)]
    if unused:
        raise ValueError("recipe rules match no parameter: " + "; ".join(
            f"{what} (pattern {pattern!r})" for what, pattern in unused)
            + ". Does the model have these parts (adapter_dim, deep_layers, heads)?")
    return labels


def check_labels(params, labels) -> None:
    """Every parameter has a label and every label is known; errors name the path."""
    flat_params = traverse_util.flatten_dict(_as_dict(params))
    flat_labels = traverse_util.flatten_dict(_as_dict(labels))
    for path in flat_params:
        if path not in flat_labels:
            raise ValueError(f"parameter '{'/'.join(path)}' has no label")
        if flat_labels[path] not in (TRAINABLE, FROZEN):
            raise ValueError(f"parameter '{'/'.join(path)}' has label {flat_labels[path]!r}; "
                             f"expected {TRAINABLE!r} or {FROZEN!r}")


def split(params, labels):
    """(trainable, frozen) flat dicts {path tuple: array}: the train step differentiates only
    the first, so no gradient of a frozen weight is ever computed."""
    flat = traverse_util.flatten_dict(_as_dict(params))
    flat_labels = traverse_util.flatten_dict(_as_dict(labels))
    trainable = {p: v for p, v in flat.items() if flat_labels[p] == TRAINABLE}
    frozen = {p: v for p, v in flat.items() if flat_labels[p] != TRAINABLE}
    return trainable, frozen


def merge(trainable: dict, frozen: dict):
    """The nested parameter tree back from `split`'s halves."""
    return traverse_util.unflatten_dict({**frozen, **trainable})


def _as_dict(tree):
    return tree.unfreeze() if hasattr(tree, "unfreeze") else tree


# ---------------------------------------------------------------------------------------------
# Parameter report
# ---------------------------------------------------------------------------------------------

def _group(path: tuple[str, ...]) -> str:
    """Report row of a parameter: tower/module, with adapters counted on their own row."""
    if any(p.startswith("adapter") for p in path):
        return f"{path[0]}/(layerwise adapters)"
    return "/".join(path[:2]) if len(path) > 2 else path[0]


def count(params, labels=None) -> tuple[int, int]:
    """(trainable, total) parameter counts; shapes are enough (works on eval_shape output)."""
    sizes = {p: int(np.prod(v.shape)) for p, v in
             traverse_util.flatten_dict(_as_dict(params)).items()}
    if labels is None:
        return sum(sizes.values()), sum(sizes.values())
    flat_labels = traverse_util.flatten_dict(_as_dict(labels))
    return sum(n for p, n in sizes.items() if flat_labels[p] == TRAINABLE), sum(sizes.values())


def report(params, labels) -> str:
    """A table per module (total, trainable, %) ending with `trainable N of M (P%)`."""
    flat = traverse_util.flatten_dict(_as_dict(params))
    flat_labels = traverse_util.flatten_dict(_as_dict(labels))
    rows: dict[str, list[int]] = {}
    for path, value in flat.items():
        row = rows.setdefault(_group(path), [0, 0])
        size = int(np.prod(value.shape))
        row[0] += size
        row[1] += size if flat_labels[path] == TRAINABLE else 0
    width = max(len(k) for k in rows) + 2
    lines = [f"{'module':<{width}}{'total':>14}{'trainable':>14}{'%':>9}"]
    for name, (total, trainable) in sorted(rows.items()):
        lines.append(f"{name:<{width}}{total:>14,}{trainable:>14,}{100 * trainable / total:>8.2f}%")
    trainable, total = count(params, labels)
    lines.append(f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return "\n".join(lines)


__all__ = ["RECIPES", "Recipe", "make_labels", "check_labels", "split", "merge", "count",
           "report", "TRAINABLE", "FROZEN"]
