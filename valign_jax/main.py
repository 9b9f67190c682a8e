"""Command-line entry point.

    python -m valign_jax.main --config=configs/lilt.py:lilt_lwa --dry_run
    python -m valign_jax.main --config=configs/lilt.py:demo --workdir=DIR

`--dry_run` builds the model from architecture presets (no weights, no data are read), prints
the parameter report and ends with `trainable N of M (P%)`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Recipe config file, e.g. configs/lilt.py:lilt_lwa",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go.")
flags.DEFINE_bool("dry_run", False, "Print the parameter report and exit; reads no weights.")
FLAGS = flags.FLAGS


def dry_run(config) -> str:
    from valign_jax import peft
    from valign_jax.models.build import build_dual_encoder
    from valign_jax.models.registry import abstract_params

    model = build_dual_encoder(config.model, use_checkpoint_config=False)
    params = abstract_params(model, **model.dummy_inputs())
    labels = peft.make_labels(params, config.peft.recipe, config.peft.overrides)
    return peft.report(params, labels)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/lilt.py:demo")
    if FLAGS.dry_run:
        print(dry_run(config))
        return
    from valign_jax import train  # the data and logging stack load only for real runs
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required for a training run")
    train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
