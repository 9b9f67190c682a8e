"""`python -m valign_jax.evaluate`: the metrics of a training run's checkpoint, or of an HF CLIP /
SigLIP / SigLIP 2 checkpoint (--hf).

    python -m valign_jax.evaluate --workdir=DIR [--step=N] [--out=FILE.json]
    python -m valign_jax.evaluate --workdir=DIR --zeroshot=tfds:cifar100/test,/data/flowers
    python -m valign_jax.evaluate --hf=openai/clip-vit-base-patch32 \\
        --config=configs/clip_refine.py --out=before.json   # CLIP-Refine's "before"
    python -m valign_jax.evaluate --workdir=SAIL_RUN --towers   # its towers end to end
    python -m valign_jax.evaluate --workdir=DIR --suite=suites/classification.json

Writes FILE.json — {"step", "source", "metrics", "ln_shift", "plots"} — and next to it
FILE_pca.png (image and text features along the line between their centroids and the main
direction of what remains),
FILE_ln_shift.png (LiLT Fig. 4: how far training moved each layer's LayerNorm) and TensorBoard
scalars in FILE_tensorboard/. FILE defaults to <workdir>/eval/step_<N>.json.

The metrics are exactly those a training run logs (evaluation/build.py builds both), from the
run's own config unless --config (same model, checked) or the flags below change the data; plus
`ln_shift/<tower>/...` against the run's initial parameters (rebuilt from its config: the seed,
the tower checkpoints or the run it started from).

--towers: a run that trained from cached features (SAIL) is evaluated with its frozen towers
rebuilt from its config and its trained heads on top, end to end, rather than from the cache.
--suite=FILE: the model on each dataset of a suite file (suite.py), one CLIP_benchmark-style
JSON per dataset and a Markdown table, into --out (a directory).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

FLAGS = flags.FLAGS


def evaluate(workdir=None, step: int | None = None, out=None, config=None, hf_path=None,
             overrides: dict | None = None, towers: bool = False) -> dict:
    """Evaluate a run's checkpoint (or an HF two-tower checkpoint); returns what it writes to
    `out`. towers: a run that trained from cached features is evaluated end to end, its frozen
    towers rebuilt from its config and its trained heads on top (`_with_towers`)."""
    from valign_jax import sharding, storage
    from valign_jax.evaluation import ln_shift, plots
    from valign_jax.evaluation.build import make_evaluator
    from valign_jax.run_setup import input_setup

    if hf_path:
        model, params, config = _from_hf(hf_path, config)
        step, source, cached = 0, str(hf_path), False
    elif workdir:
        workdir = storage.path(workdir)  # a local path or a URL (gs://...)
        model, params, step, config = _from_workdir(workdir, step, config)
        source, cached = str(workdir), bool(config.data.get("feature_cache"))
        if towers:
            model, params, config = _with_towers(workdir, params, config)
            cached = False
    else:
        raise ValueError("pass --workdir=DIR (a training run), or --hf=PATH_OR_ID with "
                         "--config=configs/<recipe>.py")
    config = _with_overrides(config, overrides or {})
    if out is None:
        if not workdir:
            raise ValueError("--out=FILE.json is required with --hf and no --workdir")
        if storage.is_url(workdir):  # the plots and TensorBoard files are written locally
            raise ValueError(f"--workdir={workdir} is a URL: pass --out=FILE.json, a local "
                             f"path for the metrics and plots")
        out = Path(workdir) / "eval" / f"step_{step}{'_towers' if towers else ''}.json"
    out = Path(out).absolute()

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    param_sh = sharding.tree_shardings(params, mesh, config.mesh.min_fsdp_size)
    placed = sharding.put(params, param_sh)
    image_size, collate = input_setup(config, model, workdir=None if hf_path else workdir)
    cache_dir = tower_features = None
    if cached:
        from valign_jax import frozen_towers
        cache_dir = frozen_towers.cache_dir(config, "eval", workdir)
        tower_features = frozen_towers.TowerFeatures(config, workdir, mesh)
    evaluators = make_evaluator(config, model, mesh, param_sh, collate, image_size, cache_dir,
                                tower_features)

    metrics, written = evaluators(placed), {}  # every evaluator, whatever its schedule
    features = next((e.last_features for e in evaluators.evaluators
                     if getattr(e, "last_features", None) is not None), None)
    if features is not None and jax.process_index() == 0:  # the PCA plot of retrieval's
        written["pca"] = str(plots.pca_plot(
            *features, _beside(out, "pca.png"),
            title=f"{Path(source).name} step {step}: gap {metrics['geometry/gap']:.3f}"))

    shift = None
    initial = _initial_params(config, model, param_sh) if not hf_path else None
    if isinstance(initial, dict):
        shift = ln_shift.ln_shift(initial, params)
        metrics.update(ln_shift.scalars(shift))
        if jax.process_index() == 0:
            written["ln_shift"] = str(plots.ln_shift_plot(shift, _beside(out, "ln_shift.png")))
    elif initial is not None:
        shift = {"skipped": initial}

    result = {"step": int(step), "source": source, "file": str(out), "metrics": metrics,
              "ln_shift": shift, "plots": written}
    if jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        from valign_jax.checkpointing import write_json
        write_json(out, result)
        _write_tensorboard(_beside(out, "tensorboard"), step, metrics)
    return result


def evaluate_suite(suite_file, workdir=None, step: int | None = None, out=None, config=None,
                   hf_path=None) -> dict:
    """--suite: a run's checkpoint (or an HF CLIP) on every dataset of a suite file, written
    as one CLIP_benchmark-style JSON per dataset and a Markdown table into `out` (default
    <workdir>/eval/suite_<file>_step_<N>/); suite.py has the format. A run that trained from
    cached features is evaluated end to end (its towers rebuilt, as with --towers).
    Returns {"dir": the output directory, "results": what each JSON holds}."""
    from valign_jax import storage, suite
    entries = suite.read_suite(suite_file)  # a bad suite file fails before any model loads
    if hf_path:
        model, params, config = _from_hf(hf_path, config)
        step, source = 0, str(hf_path)
    elif workdir:
        workdir = storage.path(workdir)
        model, params, step, config = _from_workdir(workdir, step, config)
        source = str(workdir)
        if config.data.get("feature_cache"):
            model, params, config = _with_towers(workdir, params, config)
    else:
        raise ValueError("pass --workdir=DIR (a training run), or --hf=PATH_OR_ID with "
                         "--config=configs/<recipe>.py")
    if out is None:
        if not workdir or storage.is_url(workdir):
            raise ValueError("--suite needs --out=DIR (a local directory for the results) "
                             "with --hf or a --workdir URL")
        out = Path(workdir) / "eval" / f"suite_{Path(suite_file).stem}_step_{step}"
    results = suite.run_suite(entries, model, params, config, out, source, step,
                              workdir=None if hf_path else workdir)
    return {"dir": str(Path(out).absolute()), "results": results}


def _from_workdir(workdir, step, config):
    """(model, params as host arrays, step, config) of a run's checkpoint; `config` (another
    recipe's) may change the data, never the model."""
    from valign_jax import checkpointing
    from valign_jax.build import describe, description_changes
    from valign_jax.workdir import load_run

    model, params, step, own_config = load_run(workdir, step)
    if config is None:
        config = own_config
    else:  # another config may change the data, never the model the checkpoint holds
        changed = description_changes(describe(model), describe(_model_of(config, workdir)))
        if changed:
            raise ValueError(f"--config builds a different model from the one in "
                             f"{workdir / checkpointing.MODEL_JSON} (they differ in {changed}): "
                             f"the checkpoint comes from another recipe; drop --config to use "
                             f"the run's own")
    _check_tree(params, model, f"{workdir / checkpointing.CHECKPOINTS}/{step}")
    return model, params, step, config


def _with_towers(workdir, params, config):
    """--towers: the full model of a run that trained from cached features (its frozen towers
    and its trained heads), with a config that runs them."""
    if not config.data.get("feature_cache"):
        raise ValueError(f"--towers: {workdir} did not train from cached features (its "
                         f"config.data.feature_cache is empty); its model already has towers")
    from valign_jax import frozen_towers
    return frozen_towers.with_towers(config, params)


def _model_of(config, workdir):
    from valign_jax.run_setup import build_model
    if config.data.get("feature_cache"):
        from valign_jax import frozen_towers
        return frozen_towers.cached_model(config, workdir)
    return build_model(config)


def _from_hf(hf_path, config):
    """(model, params, config) of an HF two-tower checkpoint (CLIP, SigLIP, SigLIP 2), the
    config reading its tokenizer, text length and pixel statistics from the same checkpoint."""
    from valign_jax import hf
    from valign_jax.models import registry
    if config is None:
        raise ValueError("--hf needs --config=configs/<recipe>.py: it says which data to "
                         "evaluate on")
    model, params = hf.load_dual_encoder(hf_path, dtype=config.model.dtype,
                                         scan_layers=config.model.scan_layers)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.image.checkpoint = config.model.text.checkpoint = str(hf_path)
        config.model.image.image_size = model.image_config.image_size
        if registry.family_of(model.text_config).pads_to_max_positions:  # SigLIP: pad to 64
            config.model.text.max_length = model.text_config.max_position_embeddings
        config.data.feature_cache = ""
    return model, jax.device_get(params), config


def _check_tree(params, model, source: str) -> None:
    """The checkpoint's parameters have exactly the model's names and shapes."""
    from valign_jax.models.layout import abstract_params
    expected = abstract_params(model)
    have = traverse_util.flatten_dict(params, sep="/")
    want = traverse_util.flatten_dict(expected, sep="/")
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = [f"{k}: {np.shape(have[k])} vs {want[k].shape}" for k in sorted(set(have) & set(want))
              if tuple(np.shape(have[k])) != tuple(want[k].shape)]
    if missing or extra or shapes:
        raise ValueError(f"{source} does not fit the run's model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, shapes {shapes[:5]}")


def _initial_params(config, model, param_sh):
    """The run's starting parameters as host arrays; a string saying why when they cannot be
    rebuilt (a tower checkpoint that is no longer reachable); None for a towerless model."""
    from valign_jax.models import FeaturesConfig
    from valign_jax.run_setup import initial_params
    if isinstance(model.image_config, FeaturesConfig):
        return None  # trained from cached features: no tower LayerNorms changed
    try:
        return jax.device_get(initial_params(config, model, param_sh))
    except (OSError, ValueError) as err:
        logging.warning("LN-shift analysis skipped: the initial parameters cannot be rebuilt "
                        "(%s)", err)
        return f"initial parameters unavailable: {str(err).splitlines()[0]}"


def _with_overrides(config, overrides: dict):
    """config.data.eval / config.eval.* replaced by the command line's data flags."""
    keys = {"eval_data": ("data", "eval"), "zeroshot": ("eval", "zeroshot"),
            "templates": ("eval", "templates"), "class_names": ("eval", "class_names")}
    chosen = {k: v for k, v in overrides.items() if v is not None}
    if not chosen:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for name, value in chosen.items():
            group, key = keys[name]
            config[group][key] = value
    return config


def _beside(out: Path, suffix: str) -> Path:
    return out.with_name(f"{out.stem}_{suffix}")


def _write_tensorboard(logdir: Path, step: int, metrics: dict) -> None:
    from clu import metric_writers
    writer = metric_writers.SummaryWriter(str(logdir))
    writer.write_scalars(int(step), {k: float(v) for k, v in metrics.items()})
    writer.flush()
    writer.close()


def define_flags():
    """The command line's flags; defined only when run as a program, so that importing
    `evaluate` next to valign_jax.main (which has its own --config) is fine."""
    config_flags.DEFINE_config_file("config", None, "A recipe config: required with --hf; with "
                                    "--workdir it replaces the run's own config (same model).")
    flags.DEFINE_string("workdir", None, "A training run's directory (python -m valign_jax.main).")
    flags.DEFINE_integer("step", None, "The checkpoint to evaluate (default: the latest).")
    flags.DEFINE_string("out", None, "The metrics JSON (default: <workdir>/eval/step_<N>.json).")
    flags.DEFINE_string("hf", None, "Evaluate this HF two-tower checkpoint (CLIP, SigLIP, SigLIP "
                        "2; directory or hub id) as is.")
    flags.DEFINE_bool("towers", False, "A run that trained from cached features (SAIL): run its "
                      "frozen towers end to end (rebuilt from its config) under its trained "
                      "heads, instead of reading the cache.")
    flags.DEFINE_string("suite", None, "A suite file (JSON, e.g. suites/classification.json): "
                        "evaluate on each of its datasets, one CLIP_benchmark-style JSON each "
                        "and a Markdown table, into --out (a directory).")
    flags.DEFINE_string("eval_data", None, "Replaces config.data.eval (retrieval pairs).")
    flags.DEFINE_string("zeroshot", None, "Replaces config.eval.zeroshot (comma-separated).")
    flags.DEFINE_string("templates", None, "Replaces config.eval.templates "
                        "(auto|single|clip80|clip7).")
    flags.DEFINE_string("class_names", None, "Replaces config.eval.class_names (class-name "
                        "files, comma-separated).")


def _print_suite(suite: dict) -> None:
    for r in suite["results"]:
        shown = {k: round(v, 4) for k, v in list(r["metrics"].items())[:4]}
        print(f"{r['dataset']} ({r['task']}): {shown}")
    print(f"  results: {suite['dir']}/<dataset>.json and {suite['dir']}/results.md")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from valign_jax import cli, sharding
    from valign_jax.logs import quiet_library_logs
    quiet_library_logs()
    sharding.initialize_distributed()
    overrides = {k: getattr(FLAGS, k) for k in ("eval_data", "zeroshot", "templates",
                                                 "class_names")}
    if FLAGS.suite:
        return _print_suite(cli.run_guarded(evaluate_suite, FLAGS.suite, FLAGS.workdir,
                                            FLAGS.step, FLAGS.out, FLAGS.config, FLAGS.hf))
    result = cli.run_guarded(evaluate, FLAGS.workdir, FLAGS.step, FLAGS.out, FLAGS.config,
                             FLAGS.hf, overrides, FLAGS.towers)
    shown = {k: round(v, 4) for k, v in result["metrics"].items()
             if k.startswith(("retrieval/", "zeroshot/", "geometry/gap", "ln_shift/"))
             and k.endswith(("r1", "top1", "gap", "pearson_r"))}
    print(f"step {result['step']} of {result['source']}: {shown}")
    print(f"  metrics: {result['file']}")
    for name, path in result["plots"].items():
        print(f"  {name} plot: {path}")


if __name__ == "__main__":
    from valign_jax import cli
    from valign_jax.logs import quiet_startup
    quiet_startup()  # before TensorFlow or a jax backend loads
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
