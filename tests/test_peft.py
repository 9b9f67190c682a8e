"""PEFT recipes: LiLT's Table 1 / Table 3 from `--dry_run`, frozen parameters untouched by real
optimizer steps, optimizer state only for trainable parameters, weight decay only on kernels and
embeddings, identity adapters, and errors for recipes that do not fit the model."""

import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from conftest import REPO
from valign_jax import hf, optim, peft
from valign_jax.main import dry_run
from valign_jax.models import DualEncoder
from valign_jax.models.registry import preset
from valign_jax.models.layout import overlay
from valign_jax.objectives import contrastive_objective
from valign_jax.train_step import create_state, make_train_step

TABLE1 = {"frozen": 0.00, "ln_only": 0.04, "projection": 0.20, "lilt_ln": 0.24,
          "lilt_bitfit": 0.31, "lilt_da_noln": 6.96, "lilt_da": 6.99, "lilt_lwa_noln": 6.97,
          "lilt_lwa": 7.01, "lilt_lwa_bitfit": 7.09, "lilt_da_bitfit": 7.06, "lit": 56.01,
          "lit_lwa": 57.57, "clip": 100.0}
TABLE3_MILLIONS = {"lilt_da": 14.65, "lilt_lwa": 14.67, "lit": 109.28, "clip": 195.13}


def lilt_config(arg):
    spec = importlib.util.spec_from_file_location("lilt_config", REPO / "configs" / "lilt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def last_line_numbers(report):
    line = report.strip().splitlines()[-1]
    assert line.startswith("trainable ")
    words = line.replace(",", "").replace("(", "").replace("%)", "").split()
    return int(words[1]), int(words[3]), float(words[4])


@pytest.mark.parametrize("row", sorted(TABLE1))
def test_dry_run_reproduces_lilt_table1(row):
    trainable, total, percent = last_line_numbers(dry_run(lilt_config(row)))
    assert abs(100 * trainable / total - TABLE1[row]) <= 0.02, (row, 100 * trainable / total)
    if row in TABLE3_MILLIONS:
        assert abs(trainable / 1e6 - TABLE3_MILLIONS[row]) <= 0.01, (row, trainable)


def test_dry_run_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "valign_jax.main", "--config=configs/lilt.py:lilt_lwa", "--dry_run"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "trainable 14,671,873 of 209,331,457 (7.01%)"
    assert "(layerwise adapters)" in result.stdout


# ---------------------------------------------------------------------------------------------
# Real optimizer steps on a tiny dual encoder
# ---------------------------------------------------------------------------------------------

def tiny_model(**tower):
    return DualEncoder(preset("vit_tiny", **tower), preset("bert_tiny", **tower),
                       projection_dim=32)


def optim_cfg(**changes):
    base = dict(name="adamw", lr=1e-2, warmup_init_lr=1e-2, end_lr=1e-2, warmup_steps=0,
                b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.0)
    return ml_collections.ConfigDict({**base, **changes})


def batch(n=4, seed=0):
    rng = np.random.RandomState(seed)
    return {"pixel_values": rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32),
            "input_ids": rng.randint(1, 500, (n, 8)).astype(np.int32),
            "attention_mask": np.ones((n, 8), np.int32)}


def run_steps(model, recipe, objective, steps=3, **optim_changes):
    params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs())["params"]
    labels = peft.make_labels(params, recipe)
    optimizer = optim.make_optimizer(optim_cfg(**optim_changes), labels, total_steps=steps)
    state = create_state(params, optimizer, jax.random.PRNGKey(1))
    step = jax.jit(make_train_step(model, optimizer, labels, objective, "lilt"))
    for i in range(steps):
        state, metrics = step(state, batch(seed=i))
    return params, labels, state, metrics


def flat(tree):
    return traverse_util.flatten_dict(tree)


@pytest.mark.parametrize("recipe", ["lilt_lwa", "lilt_bitfit"])
def test_frozen_parameters_bit_identical_and_state_only_for_trainable(recipe):
    model = tiny_model(adapter_dim=8)
    before, labels, state, metrics = run_steps(model, recipe, contrastive_objective())
    assert np.isfinite(float(metrics["loss"]))
    labels_flat, after = flat(labels), flat(state.params)
    changed = 0
    for path, value in flat(before).items():
        same = np.array_equal(np.asarray(value), np.asarray(after[path]))
        if labels_flat[path] == peft.FROZEN:
            assert same, f"frozen {'/'.join(path)} changed"
        else:
            changed += not same
    assert changed > 0
    trainable, _ = peft.count(before, labels)
    # Adam keeps mu and nu (float) per trainable entry and nothing per frozen one; its step
    # counts are int32.
    state_entries = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.opt_state)
                        if jnp.issubdtype(x.dtype, jnp.floating))
    assert state_entries == 2 * trainable


def test_weight_decay_only_on_trainable_kernels_and_embeddings():
    """With a loss that has zero gradient, AdamW's only update is the decay term -lr*wd*p: so
    exactly the trainable kernels/embeddings move, and no bias, LayerNorm or frozen weight."""
    def zero_loss(out, batch, rng):
        return 0.0 * (out["image"].sum() + out["text"].sum()), {}
    model = tiny_model(adapter_dim=8)
    before, labels, state, _ = run_steps(model, "lilt_lwa", zero_loss, steps=1)
    labels_flat, after = flat(labels), flat(state.params)
    moved = {p for p, v in flat(before).items() if not np.array_equal(v, after[p])}
    expected = {p for p in flat(before) if labels_flat[p] == peft.TRAINABLE
                and p[-1] in ("kernel", "embedding")}
    assert moved == expected and expected


def test_identity_adapters_leave_the_pretrained_tower_unchanged(torch_fixture):
    path, ref = torch_fixture("bert")
    tower, pretrained = hf.load_tower(path)
    with_adapters = tower.clone(config=tower.config.replace(adapter_dim=8,
                                                            adapter_init="identity"))
    params = with_adapters.init(jax.random.PRNGKey(0), ref["input_ids"])["params"]
    params = overlay(params, pretrained)
    assert any("adapter" in "/".join(p) for p in flat(params))
    a = tower.apply({"params": pretrained}, ref["input_ids"], ref["attention_mask"])
    b = with_adapters.apply({"params": params}, ref["input_ids"], ref["attention_mask"])
    np.testing.assert_allclose(a["last_hidden_state"], b["last_hidden_state"], atol=1e-6)
    normal = tower.clone(config=tower.config.replace(adapter_dim=8))  # LiLT's N(0, 0.02) init
    p2 = overlay(normal.init(jax.random.PRNGKey(0), ref["input_ids"])["params"], pretrained)
    c = normal.apply({"params": p2}, ref["input_ids"], ref["attention_mask"])
    assert np.abs(np.asarray(c["last_hidden_state"] - a["last_hidden_state"])).max() > 1e-4


def test_recipe_errors_name_the_pattern_or_path():
    model = tiny_model()  # no adapters
    params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs())["params"]
    with pytest.raises(ValueError, match=r"image:adapters \(pattern '\^vision_model/\.\*/adapter"):
        peft.make_labels(params, "lilt_lwa")
    with pytest.raises(ValueError, match=r"override 'nothing_here=trainable'"):
        peft.make_labels(params, "lilt_ln", overrides=["nothing_here=trainable"])
    with pytest.raises(ValueError, match=r"parameter 'vision_model/embeddings/[^']+' is matched by no rule"):
        peft.make_labels(params, "lilt_ln", default=None)
    labels = peft.make_labels(params, "lilt_ln")
    del labels["text_projection"]
    with pytest.raises(ValueError, match="'text_projection/kernel' has no label"):
        peft.check_labels(params, labels)
    with pytest.raises(ValueError, match="unknown recipe 'lilt_lora'"):
        peft.make_labels(params, "lilt_lora")


def test_overrides_win_over_the_recipe():
    model = tiny_model()
    params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs())["params"]
    labels = flat(peft.make_labels(params, "lilt_ln",
                                   overrides=[r"^text_model/encoder/layer/1/=trainable",
                                              r"^visual_projection/=frozen"]))
    assert labels[("text_model", "encoder", "layer", "1", "attention", "self", "query",
                   "kernel")] == peft.TRAINABLE
    assert labels[("visual_projection", "kernel")] == peft.FROZEN


def test_lilt_ln_step_computes_no_frozen_weight_gradients():
    """Compiled FLOPs: the LN-only step skips every frozen kernel's weight gradient, so it
    costs clearly less than the full step at the same batch (base-size figures: BENCHMARKS.md)."""
    model = tiny_model()
    params = model.init(jax.random.PRNGKey(0), **model.dummy_inputs())["params"]
    flops = {}
    for recipe in ("lilt_ln", "full"):
        labels = peft.make_labels(params, recipe)
        optimizer = optim.make_optimizer(optim_cfg(), labels, total_steps=10)
        state = create_state(params, optimizer, jax.random.PRNGKey(1))
        step = make_train_step(model, optimizer, labels, contrastive_objective(), "lilt")
        compiled = jax.jit(step).lower(state, batch(16)).compile()
        flops[recipe] = compiled.cost_analysis()["flops"]
    assert flops["lilt_ln"] < 0.8 * flops["full"], flops
