"""Bad input to a training run fails early with an error that says what to change."""

import os
import subprocess
import sys

import pytest

from valign_jax import recipes, train

from conftest import REPO
from train_helpers import tiny_config


def run_main(*args, env=None):
    return subprocess.run([sys.executable, "-m", "valign_jax.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_unknown_config_key_lists_the_valid_keys():
    """A misspelt --config.optim.lrr on the command line: main exits non-zero naming the key
    and listing the valid ones (lr, weight_decay)."""
    proc = run_main("--config=configs/clip.py:demo", "--config.optim.lrr=1", "--dry_run")
    assert proc.returncode != 0
    assert "unknown config key 'config.optim.lrr'" in proc.stderr
    assert "'lr'" in proc.stderr and "'weight_decay'" in proc.stderr


def test_unknown_variant_lists_the_valid_ones():
    """A misspelt variant (lilt_lwaa): main exits non-zero naming it and listing the variants
    and modifiers."""
    proc = run_main("--config=configs/lilt.py:lilt_lwaa", "--dry_run")
    assert proc.returncode != 0
    assert "unknown config argument 'lilt_lwaa'" in proc.stderr
    assert "'lilt_lwa'" in proc.stderr and "'demo'" in proc.stderr


def test_unwritable_workdir_fails_before_any_compute(tmp_path, monkeypatch):
    """A workdir under a regular file: the OSError names the path, and the model is never
    built (build_model raises if called)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")

    def no_compute(*args, **kwargs):
        raise AssertionError("the model was built before the workdir was checked")
    monkeypatch.setattr(train, "build_model", no_compute)
    with pytest.raises(OSError, match="cannot write to the workdir .*a_file/run"):
        train.train_and_evaluate(tiny_config("clip"), blocker / "run")


def test_real_checkpoints_offline_say_to_use_demo_or_a_local_path(tmp_path):
    """The real LiLT recipe offline: the error names the hub id it could not fetch and points
    to :demo or local directories."""
    proc = run_main("--config=configs/lilt.py", f"--workdir={tmp_path / 'run'}",
                    env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "facebook/deit-base-patch16-224" in proc.stderr
    assert "':demo'" in proc.stderr and "local directories" in proc.stderr


def test_pretrain_stage_config_must_exist(tmp_path):
    """A CLIP-Refine run whose pretrain stage names a missing config file fails naming it."""
    config = tiny_config("clip_refine")
    config.pretrain = str(REPO / "configs/no_such_recipe.py:demo")
    with pytest.raises(FileNotFoundError, match="no_such_recipe.py"):
        train.train_and_evaluate(config, tmp_path)


def test_a_workdir_holding_another_model_is_refused(tmp_path):
    """Resuming a workdir with a different model (projection_dim) is refused naming the
    field, rather than restoring mismatched arrays."""
    train.train_and_evaluate(tiny_config("clip", steps=1), tmp_path)
    other = tiny_config("clip", steps=1)
    other.model.projection_dim = 32
    with pytest.raises(ValueError, match="different model .*projection_dim"):
        train.train_and_evaluate(other, tmp_path)


def test_load_config_names_a_missing_file():
    """load_config of a missing recipe file raises FileNotFoundError naming the file."""
    with pytest.raises(FileNotFoundError, match="nowhere.py"):
        recipes.load_config("configs/nowhere.py:demo")
