"""Bad configs fail before any compute, every problem named by its config key: unknown keys
(nested ones too, in config files other than ours), wrong types, values out of range, options
that contradict each other, and a batch the devices cannot split."""

import importlib
import sys
import textwrap

import jax
import ml_collections
import pytest

from valign_jax import frozen_towers, train
from valign_jax.config_checks import ConfigError, check_config, find_problems
from valign_jax.recipes import load_config

from conftest import REPO
from test_train_errors import run_main
from train_helpers import RECIPES, tiny_config


def test_every_recipe_and_variant_passes():
    """Loads every variant of every recipe, with and without `demo`, and asserts the checks
    find no problem: what the checks demand is what our own configs do."""
    sys.path.insert(0, str(REPO / "configs"))
    try:
        for recipe in RECIPES:
            for variant in importlib.import_module(recipe).VARIANTS:
                for arg in (variant, f"{variant},demo"):
                    config = load_config(f"{REPO}/configs/{recipe}.py:{arg}")
                    assert find_problems(config) == [], f"{recipe}.py:{arg}"
    finally:
        sys.path.remove(str(REPO / "configs"))


USER_CONFIG = """
from valign_jax import recipes

def get_config(arg=None):
    c = recipes.base_config()
    recipes.demo_towers(c)
    recipes.demo(c, steps=10)
    c.data.feature_cahce = "cache"        # typos a locked config would refuse on the command line
    c.model.image.adaptor_dim = 8
    c.optim.warmup_step = 5
    c.sweep = 3
    return c
"""


def test_unknown_keys_in_a_user_config_file_are_named(tmp_path):
    """Writes a config file of the user's own, built on valign_jax.recipes with misspelt keys in
    nested sections (data, model.image, optim) and at the top; checking it raises one
    ConfigError that names every key with the valid keys of its section and the likely
    intended one."""
    (tmp_path / "mine.py").write_text(USER_CONFIG)
    with pytest.raises(ConfigError) as err:
        check_config(load_config(str(tmp_path / "mine.py")))
    message = str(err.value)
    assert "4 problems" in message
    assert "config.data.feature_cahce: unknown key; did you mean 'feature_cache'?" in message
    assert "config.model.image.adaptor_dim: unknown key; did you mean 'adapter_dim'?" in message
    assert "config.optim.warmup_step: unknown key; did you mean 'warmup_steps'?" in message
    assert "config.sweep: unknown key" in message
    assert "valid keys of config.model.image: ['adapter_dim', 'checkpoint'," in message


def test_wrong_types_and_missing_keys_are_named():
    """Rebuilds the clip demo config from a plain dict (so ml_collections no longer pins the
    types) with a string batch size, a float caption length, an int for a bool, a 2-vector
    for the 3-channel mean, a string logit scale and a key removed; asserts each is named
    with what was expected and what was found."""
    values = tiny_config("clip").to_dict()
    values["batch_size"] = "512"
    values["model"]["text"]["max_length"] = 16.5
    values["objective"]["chunked"] = 1
    values["data"]["image_mean"] = (0.5, 0.5)
    values["model"]["logit_scale_init"] = "4.6"
    del values["optim"]["b2"]
    problems = find_problems(ml_collections.ConfigDict(values))
    assert sorted(problems) == sorted([
        "config.batch_size: expected an int, got str '512'",
        "config.model.text.max_length: expected an int, got float 16.5",
        "config.objective.chunked: expected True or False, got int 1",
        "config.data.image_mean: expected 3 items, got 2",
        "config.model.logit_scale_init: expected a number, got str '4.6'",
        "config.optim.b2: missing (valign_jax.schema.base_config() has every key with its "
        "default; build on it)"])


@pytest.mark.parametrize("recipe, changes, expected", [
    ("clip", {"batch_size": -8}, "config.batch_size=-8: must be >= 1"),
    ("clip", {"total_steps": -1}, "config.total_steps=-1: must be >= 0"),
    ("clip", {"eval.rerank_k": 0}, "config.eval.rerank_k=0: must be >= 1"),
    ("clip", {"optim.warmup_fraction": 1.5}, "config.optim.warmup_fraction=1.5: must be in [0, 1)"),
    ("clip", {"mesh.fsdp": 0}, "config.mesh.fsdp=0: must be >= 1, or -1"),
    ("clip", {"optim.name": "adam"}, "config.optim.name='adam': expected one of ['adamw'"),
    ("clip", {"peft.recipe": "lilt_lwaa"}, "config.peft.recipe='lilt_lwaa': expected one of"),
    ("clip", {"eval.templates": "clip81"}, "config.eval.templates='clip81': not a template set"),
    ("clip", {"peft.overrides": ("^logit_scale$",)}, "config.peft.overrides: override "),
    ("clip", {"model.image.pooling": "max"}, "config.model.image: CLIPVisionConfig: pooling='max'"),
    ("clip", {"model.image.preset": "vit_g"}, "config.model.image: unknown architecture preset"),
    # incompatible options
    ("clip", {"objective.multi_positive": True},
     "config.objective.multi_positive=True applies to the sigmoid objective only; "
     "config.objective.kind is 'softmax'"),
    ("clip", {"objective.norm": "pairs"}, "config.objective.norm='pairs' applies to the sigmoid"),
    # chunked is an option of both objectives with a ring form: one message naming both
    ("clip_refine", {"objective.chunked": True},
     "config.objective.chunked=True applies to the softmax and sigmoid objectives only; "
     "config.objective.kind is 'clip_refine'"),
    # gradient caching: an objective that runs the model inside its loss, a batch that does
    # not split (tiny configs have batch 8)
    ("fusion", {"micro_batches": 2},
     "config.micro_batches=2 computes the loss from the towers' outputs cached per "
     "micro-batch, but config.objective.itm_weight=1.0 (image-text matching of the fusion head "
     "on in-batch hard negatives) runs the model inside the loss"),
    ("clip", {"micro_batches": 3},
     "config.batch_size=8 does not split into config.micro_batches=3 equal micro-batches"),
    ("clip", {"micro_batches": 0}, "config.micro_batches=0: must be >= 1"),
    ("clip", {"objective.itm_weight": 1.0},
     "config.objective.itm_weight > 0 needs a model with fusion layers (config.model."
     "fusion_layers > 0"),
    ("clip", {"model.logit_bias_init": -10.0},
     "config.model.logit_bias_init=-10.0: the logit preset 'clip'"),
    ("lilt", {"model.text.adapter_dim": 0},
     "config.model.text.adapter_dim is 0, but config.peft.recipe='lilt_lwa' trains the text "
     "tower's adapters"),
    ("lilt", {"peft.recipe": "lilt_da"},
     "config.model.image.deep_layers is 0, but config.peft.recipe='lilt_da'"),
    ("sail", {"peft.recipe": "lit"},
     "config.data.feature_cache='feature_cache' trains from cached tower outputs, but "
     "config.peft.recipe='lit' trains the text tower"),
    ("fusion", {"data.feature_cache": "cache"},
     "config.data.feature_cache='cache' holds pooled features, but config.model.fusion_layers=2"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_bad_values_and_incompatible_options_are_named(recipe, changes, expected):
    """Takes a tiny demo config of `recipe`, applies one bad change (a value out of range, an
    unknown name, or an option that contradicts another) and asserts the ConfigError names
    the key(s) involved."""
    config = tiny_config(recipe)
    for key, value in changes.items():
        *sections, leaf = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[leaf] = value
    with pytest.raises(ConfigError) as err:
        check_config(config)
    assert expected in str(err.value)


def test_caching_features_needs_a_cache_directory():
    """Checks the clip demo (no feature cache) for --mode=cache_features and asserts the error
    names config.data.feature_cache; the same config passes in train mode."""
    config = tiny_config("clip")
    with pytest.raises(ConfigError, match="config.data.feature_cache is empty: "
                                          "--mode=cache_features needs"):
        check_config(config, mode="cache_features")
    check_config(config)


def test_a_bad_pretrain_stage_is_named_before_the_first_stage_runs(tmp_path):
    """Gives the CLIP-Refine demo a pretrain stage whose config file sets a negative batch
    size; asserts the error names config.pretrain and the stage's key."""
    (tmp_path / "stage.py").write_text(textwrap.dedent(f"""
        from valign_jax import recipes
        def get_config(arg=None):
            c = recipes.load_config({str(REPO / 'configs' / 'clip.py')!r} + ":demo")
            c.batch_size = -1
            return c
    """))
    config = tiny_config("clip_refine")
    config.pretrain = str(tmp_path / "stage.py")
    with pytest.raises(ConfigError, match=r"config.pretrain='.*stage.py': config.batch_size=-1"):
        check_config(config)


def test_train_and_evaluate_refuses_a_bad_config_before_any_compute(tmp_path, monkeypatch):
    """Makes building a model, reading the feature cache, preparing the workdir and every
    jax.jit raise, then calls train_and_evaluate with a config holding an unknown key and an
    incompatible option: asserts the ConfigError names both, and the workdir was never made."""
    def forbidden(*args, **kwargs):
        raise AssertionError("compute started before the config was checked")
    for target, name in ((train, "build_model"), (train, "RunDirectory"),
                         (frozen_towers, "cached_model"), (jax, "jit")):
        monkeypatch.setattr(target, name, forbidden)
    config = tiny_config("sail")
    config.data.feature_cache_dir = "cache"
    config.objective.itm_weight = 0.5
    with pytest.raises(ConfigError) as err:
        train.train_and_evaluate(config, tmp_path / "run")
    assert "config.data.feature_cache_dir: unknown key" in str(err.value)
    assert "config.objective.itm_weight > 0 needs" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_main_checks_dry_runs_and_training_runs_first(tmp_path):
    """Runs the command line twice: a --dry_run of a user config file with misspelt nested
    keys, and a training run on 8 simulated devices with --config.batch_size=12. Asserts both
    exit 1 with a FATAL line naming the keys (and the 8-way split), that the dry run printed no
    parameter table, and that the training run never created its workdir."""
    (tmp_path / "mine.py").write_text(USER_CONFIG)
    proc = run_main(f"--config={tmp_path / 'mine.py'}", "--dry_run")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "FATAL: invalid config (4 problems)" in proc.stderr
    assert "config.model.image.adaptor_dim: unknown key" in proc.stderr
    assert "trainable" not in proc.stdout

    workdir = tmp_path / "run"
    proc = run_main("--config=configs/clip.py:demo", "--config.batch_size=12",
                    f"--workdir={workdir}", env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS":
                                                 "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert ("config.batch_size=12 is not divisible by the data-parallel size 8"
            in proc.stderr), proc.stderr[-2000:]
    assert not workdir.exists()
