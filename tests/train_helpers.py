"""Shared by the training-system tests: demo configs shrunk to a few tiny steps."""

from valign_jax.recipes import load_config

from conftest import REPO

RECIPES = ("clip", "siglip", "lit", "lilt", "sail", "clip_refine", "fusion")


def shrink(config, steps: int = 2, batch_size: int = 8):
    """A demo config cut to `steps` steps of `batch_size` on a small synthetic split."""
    config.total_steps = steps
    config.batch_size = batch_size
    config.data.num_train, config.data.num_eval = 64, 16
    config.eval.batch_size = 16
    config.log_every = config.eval_every = config.checkpoint_every = steps
    return config


def tiny_config(recipe: str, arg: str = "demo", **kwargs):
    return shrink(load_config(f"{REPO}/configs/{recipe}.py:{arg}"), **kwargs)
