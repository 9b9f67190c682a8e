"""Command-line entry point.

    python -m valign_jax.main --config=configs/lilt.py:lilt_lwa --dry_run
    python -m valign_jax.main --config=configs/lilt.py:demo --workdir=DIR

`--dry_run` builds the model from architecture presets (no weights, no data are read), prints
the parameter report and ends with `trainable N of M (P%)`.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from valign_jax import cli

config_flags.DEFINE_config_file("config", None, "Recipe config file, e.g. configs/lilt.py:lilt_lwa",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go "
                    "(default: workdirs/<recipe>_<config argument>; rerunning resumes there).")
flags.DEFINE_bool("dry_run", False, "Print the parameter report and exit; reads no weights.")
flags.DEFINE_enum("mode", "train", ["train", "cache_features"],
                  "train: train and evaluate in --workdir. cache_features: run the frozen "
                  "towers once over the data into config.data.feature_cache.")
FLAGS = flags.FLAGS


def dry_run(config) -> str:
    from valign_jax import peft
    from valign_jax.build import build_dual_encoder
    from valign_jax.models.layout import abstract_params

    model = build_dual_encoder(config.model, use_checkpoint_config=False)
    params = abstract_params(model)
    labels = peft.make_labels(params, config.peft.recipe, config.peft.overrides)
    return peft.report(params, labels)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/lilt.py:demo")
    print(cli.run_guarded(run, config))


def run(config) -> str:
    """What the flags ask for; returns the lines to print at the end. Every mode checks the
    config first (config_checks), so a bad key or option fails before any compute."""
    from valign_jax.config_checks import check_config
    if FLAGS.dry_run:
        check_config(config, devices=False)  # describes the model, not this machine's devices
        return dry_run(config)
    from valign_jax import sharding, train  # the data and logging stack load only for real runs
    from valign_jax.logs import quiet_library_logs
    quiet_library_logs()
    sharding.initialize_distributed()  # a no-op unless the launcher set VALIGN_* variables
    workdir = FLAGS.workdir or default_workdir(sys.argv)
    if FLAGS.mode == "cache_features":  # relative config.data.feature_cache: in the workdir
        from valign_jax import frozen_towers
        check_config(config, mode="cache_features")
        return "\n".join(f"features cached in {path}"
                         for path in frozen_towers.cache_all(config, workdir))
    metrics = train.train_and_evaluate(config, workdir)  # checks the config before anything
    return summary(workdir, metrics)


def default_workdir(argv) -> str:
    """workdirs/<recipe>_<argument>, from --config=configs/<recipe>.py:<argument>."""
    from pathlib import Path
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "run")
    path, _, arg = spec.partition(":")
    name = "_".join(t for t in [Path(path).stem, *arg.split(",")] if t)
    return str(Path("workdirs") / name)


def summary(workdir: str, metrics: dict) -> str:
    """What the run left behind and where: the last lines a user sees."""
    from valign_jax import storage
    workdir = storage.path(workdir)
    shown = {k: round(v, 4) for k, v in metrics.items()
             if k.startswith(("retrieval/", "retrieval_reranked/", "zeroshot/", "geometry/gap",
                              "train/loss"))
             and not k.endswith(("r5", "top5", "per_dim"))}
    lines = [f"finished at step {metrics.get('step')}: {shown}",
             f"  metrics (one JSON line per evaluation): {workdir / 'metrics.jsonl'}",
             f"  checkpoints (resume: rerun the same command): {workdir / 'checkpoints'}",
             f"  TensorBoard: tensorboard --logdir {workdir}",
             f"  load it: valign_jax.load_trained({str(workdir)!r})"]
    return "\n".join(lines)


parse_flags = cli.parse_flags


if __name__ == "__main__":
    from valign_jax.logs import quiet_startup
    quiet_startup()  # before TensorFlow or a jax backend loads
    app.run(main, flags_parser=parse_flags)
