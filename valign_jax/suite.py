"""A benchmark suite in one command: one checkpoint on a list of datasets and tasks.

    python -m valign_jax.evaluate --workdir=DIR --suite=suites/classification.json
    python -m valign_jax.evaluate --hf=openai/clip-vit-base-patch32 --config=configs/clip.py \\
        --suite=suites/classification.json --out=results/clip_b32

A suite file is JSON: a list of entries (or {"datasets": [...]}), one dataset each:

    [{"task": "zeroshot", "data": "tfds:cifar10/test"},
     {"task": "zeroshot", "data": "/data/flowers", "name": "flowers",
      "class_names": "/data/flowers_names.txt", "templates": "clip80", "limit": 5000},
     {"task": "retrieval", "data": "tfds:coco_captions/test", "name": "mscoco_captions"},
     {"task": "compositional", "data": "/data/sugarcrepe/swap_att.jsonl"},
     {"task": "fewshot", "data": "tfds:cifar10/train", "test": "tfds:cifar10/test",
      "shots": "1,5,10"}]

`task` is an evaluator type (evaluation/registry.py), `data` its source, `name` the dataset's
name in the results (default: the tfds name, or the file or folder name). The other keys are the
type's own options (docs/metrics.md), and for zero-shot also `templates`, `class_names` (one
file) and `limit` (config.eval.templates / class_names / zeroshot_limit for this dataset).
Every entry is checked before any model is built: unknown keys, missing files, bad options.

Written to the output directory: `<name>.json` per dataset in CLIP_benchmark's result layout,
{"dataset", "model", "pretrained", "task", "metrics"} (plus "step"), with CLIP_benchmark's task
and metric names where it has them (zero-shot classification: acc1, acc5,
mean_per_class_recall; retrieval: image_retrieval_recall@k = text->image R@k,
text_retrieval_recall@k = image->text R@k), so the numbers sit beside published ones; and
`results.md`, one Markdown table per task, a row per dataset.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax

# CLIP_benchmark's task names; other evaluator types keep their own.
TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
         "fewshot": "fewshot_linear_probe", "compositional": "compositional"}
ZEROSHOT_KEYS = {"templates": "templates", "class_names": "class_names",
                 "limit": "zeroshot_limit"}   # entry key -> config.eval key
_RENAMES = [(re.compile(p), r) for p, r in (
    (r"^top(\d+)$", r"acc\1"), (r"^t2i_r(\d+)$", r"image_retrieval_recall@\1"),
    (r"^i2t_r(\d+)$", r"text_retrieval_recall@\1"), (r"^accuracy$", "acc"),
    (r"^(text|image|group)$", r"\1_score"), (r"^(\d+)shot$", r"\1shot_acc1"))]
_PER_DATASET = ("zeroshot", "compositional", "compositional_reranked", "fewshot")


def default_name(spec: str) -> str:
    """The results' name of a dataset: the tfds name, `synthetic_<name>`, or the file's or
    folder's name without its extension."""
    if spec.startswith("tfds:"):
        return spec[len("tfds:"):].split("/")[0]
    if spec.startswith("synthetic:"):
        return "synthetic_" + spec.split(":", 1)[1]
    return Path(spec.rstrip("/")).stem or "dataset"


def read_suite(path) -> list[dict]:
    """The entries of a suite file, each checked for its keys (not yet its data)."""
    from valign_jax.evaluation import registry
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--suite={str(path)!r}: not a file")
    try:
        suite = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    entries = suite.get("datasets") if isinstance(suite, dict) else suite
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of entries, or "
                         f"{{\"datasets\": [...]}}, each {{\"task\", \"data\"[, \"name\", "
                         f"options]}}")
    out, names = [], {}
    for i, entry in enumerate(entries):
        where = f"{path} entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {entry!r:.80}")
        for key in ("task", "data"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ValueError(f"{where}: {key!r} must be a non-empty string")
        if "," in entry["data"]:
            raise ValueError(f"{where}: data={entry['data']!r} lists several datasets; give "
                             f"each its own entry")
        try:
            kind = registry.evaluator_type(entry["task"])
        except ValueError as err:
            raise ValueError(f"{where}: task: {err}") from None
        allowed = {"task", "data", "name", *kind.options}
        if kind.name == "zeroshot":
            allowed |= set(ZEROSHOT_KEYS)
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} for task {kind.name!r}; it "
                             f"takes {sorted(allowed)}")
        name = str(entry.get("name") or default_name(entry["data"]))
        if not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(f"{where}: name={name!r} must be usable as a file name "
                             f"(letters, digits, _ . + -)")
        if name in names:
            raise ValueError(f"{where}: name {name!r} is entry {names[name]}'s too; give one "
                             f"of them another \"name\"")
        names[name] = i
        out.append({**entry, "name": name})
    return out


def entry_config(config, entry: dict):
    """The run's config evaluating only this entry: config.evals holds it alone."""
    from valign_jax.evaluation import registry
    from valign_jax.schema import eval_entry
    kind = registry.evaluator_type(entry["task"])
    options = {}
    for key, value in entry.items():
        if key in kind.options:
            # A list of shots and the like, written as the comma-separated strings configs use.
            default = kind.options[key]
            options[key] = (",".join(str(v) for v in value)
                            if isinstance(default, str) and isinstance(value, list) else value)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.evals = {entry["name"]: eval_entry(kind.name, data=entry["data"], **options)}
        for key, config_key in ZEROSHOT_KEYS.items():
            if kind.name == "zeroshot" and key in entry:
                config.eval[config_key] = entry[key]
        if kind.name == "zeroshot" and "class_names" not in entry:
            config.eval.class_names = ""
    return config


def check_entries(config, entries: list[dict]) -> None:
    """Every entry's own checks (missing files, bad options), all reported at once."""
    from valign_jax.config_checks import eval_entry_problems
    from valign_jax.evaluation import registry
    problems = []
    for entry in entries:
        cfg = entry_config(config, entry)
        unknown: list = []
        eval_entry_problems(entry["name"], cfg.evals[entry["name"]], unknown, problems)
        problems += unknown
        kind = registry.evaluator_type(entry["task"])
        if kind.check is not None:
            problems += kind.check(cfg, cfg.evals[entry["name"]], entry["name"])
        if kind.name == "zeroshot" and "class_names" in entry \
                and not Path(entry["class_names"]).is_file():
            problems.append(f"{entry['name']}.class_names={entry['class_names']!r}: no such "
                            f"file")
    if problems:
        raise ValueError("the suite's entries have problems:\n  " + "\n  ".join(problems))


def result_metrics(metrics: dict) -> dict:
    """Our metric names (`zeroshot/cifar10/top1`) -> CLIP_benchmark's (`acc1`) where it has
    them; others lose their group and dataset (`geometry/gap` -> `gap`); a fusion model's
    re-ranked scores are `reranked_<name>`."""
    out = {}
    for key, value in metrics.items():
        group, *rest = key.split("/")
        if group in _PER_DATASET:
            rest = rest[1:]
        *prefix, name = rest
        for pattern, replacement in _RENAMES:
            if pattern.match(name):
                name = pattern.sub(replacement, name)
                break
        if group.endswith("_reranked"):
            name = f"reranked_{name}"
        out["/".join([*prefix, name])] = float(value)
    return out


def markdown_table(results: list[dict], title: str) -> str:
    """One table per task: a row per dataset, a column per metric (in first-seen order)."""
    lines = [f"# {title}", ""]
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        columns = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
        lines += [f"## {task}", "", "| dataset | " + " | ".join(columns) + " |",
                  "| --- |" + " ---: |" * len(columns)]
        for r in rows:
            cells = [f"{r['metrics'][c]:.4f}" if c in r["metrics"] else "" for c in columns]
            lines.append(f"| {r['dataset']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run_suite(entries: list[dict], model, params, config, out_dir, source: str,
              step: int = 0, workdir=None) -> list[dict]:
    """Evaluate the model on each entry; writes `<name>.json` per entry and `results.md` to
    out_dir (process 0) and returns the results. workdir: the run's, where a tokenizer it
    learned is kept (None for an HF checkpoint)."""
    from valign_jax import sharding
    from valign_jax.batched import FeatureEncoder, eval_batch_size
    from valign_jax.checkpointing import write_json
    from valign_jax.evaluation import registry
    from valign_jax.evaluation.inputs import ModelInputs
    from valign_jax.run_setup import input_setup

    check_entries(config, entries)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    param_sh = sharding.tree_shardings(params, mesh, config.mesh.min_fsdp_size)
    placed = sharding.put(params, param_sh)
    image_size, collate = input_setup(config, model, workdir=workdir)
    # One encoder for every entry: each model method compiles once per batch shape.
    encoder = FeatureEncoder(model, mesh, param_sh, eval_batch_size(config.eval.batch_size, mesh))
    out_dir = Path(out_dir)
    model_name = Path(str(source).rstrip("/")).name
    results = []
    for entry in entries:
        cfg = entry_config(config, entry)
        ctx = registry.EvalContext(cfg, model, mesh, param_sh, collate, image_size, encoder,
                                   inputs=ModelInputs(collate))
        evaluator = registry.evaluator_type(entry["task"]).build(ctx, cfg.evals[entry["name"]])
        if evaluator is None:
            raise ValueError(f"suite entry {entry['name']!r}: its evaluator asks for nothing")
        results.append({"dataset": entry["name"], "model": model_name, "pretrained": str(source),
                        "task": TASKS.get(entry["task"], entry["task"]), "step": int(step),
                        "metrics": result_metrics(evaluator(placed))})
        if jax.process_index() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json(out_dir / f"{entry['name']}.json", results[-1])
    if jax.process_index() == 0:
        (out_dir / "results.md").write_text(markdown_table(
            results, f"{model_name} (step {step})") + f"\n`{source}`\n")
    return results
