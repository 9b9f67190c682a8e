"""Issue 26 end to end at reduced steps: `papers.run all` pretrains both towers through the one
training loop, exports them, trains three LiLT rows (frozen, LiLT-LN, LiLT-LwA) and two SAIL
alignment layers (linear, GLU) that start from them; the files, the tables' rows, the weights
each run loaded and what stayed frozen are checked against the exported towers themselves."""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

import valign_jax
from valign_jax import hf, peft, recipes, sharding
from valign_jax.run_setup import initial_params

from papers import run as papers_run

ROWS = ("frozen", "lilt_ln", "lilt_lwa")
HEADS = ("linear", "glu")


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def papers(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("papers")
    mp = pytest.MonkeyPatch()
    mp.setenv(recipes.PRETRAINED_TOWERS_ENV, str(workdir / "towers"))  # restored afterwards
    try:
        results = papers_run.run("all", workdir, workdir / "towers", rows=ROWS, heads=HEADS,
                                 steps={"pretrain": 40, "lilt": 15, "sail": 15},
                                 log=lambda _: None)
    finally:
        mp.undo()
    return workdir, results


def test_the_stages_pretrain_their_tower_only(papers):
    workdir, results = papers
    towers = results["towers"]
    assert towers["image"]["heldout_end"] >= 3 * towers["image"]["heldout_start"]  # 1/24 at 0
    assert towers["text"]["heldout_end"] >= towers["text"]["heldout_start"] + 0.05
    for side, trained, locked in (("image", "vision_model", "text_model"),
                                  ("text", "text_model", "vision_model")):
        stage = workdir / "pretrain" / side
        model, params, config = valign_jax.load_trained(stage)
        assert (stage / "metrics.jsonl").is_file() and config.objective.kind == (
            "classification" if side == "image" else "masked_lm")
        mesh = sharding.make_mesh()
        start = flat(jax.device_get(initial_params(
            config, model, sharding.tree_shardings(params, mesh))))
        end = flat(params)
        changed = {p for p in end if not np.array_equal(start[p], end[p])}
        assert changed and all(p.startswith(trained) or p.startswith("visual_projection")
                               for p in changed), sorted(changed)[:5]
        assert not any(p.startswith(locked) for p in changed)


def test_exported_towers_are_what_the_stages_trained(papers):
    workdir, _ = papers
    for side, name in (("image", "vision_model"), ("text", "text_model")):
        _, exported = hf.load_tower(workdir / "towers" / side)
        _, params, _ = valign_jax.load_trained(workdir / "pretrain" / side)
        trained = flat(params[name])
        assert flat(exported).keys() == trained.keys()
        for path, value in flat(exported).items():
            np.testing.assert_array_equal(value, trained[path], err_msg=path)
    assert (workdir / "towers" / "text" / "tokenizer.json").is_file()
    assert json.loads((workdir / "towers" / "towers.json").read_text()).keys() == {"image",
                                                                                  "text"}


def test_rows_load_the_pretrained_towers_and_keep_frozen_what_the_recipe_freezes(papers):
    workdir, _ = papers
    image = flat(hf.load_tower(workdir / "towers" / "image")[1])
    text = flat(hf.load_tower(workdir / "towers" / "text")[1])
    export = {**{f"vision_model/{k}": v for k, v in image.items()},
              **{f"text_model/{k}": v for k, v in text.items()}}
    for row in ROWS:
        model, params, config = valign_jax.load_trained(workdir / "lilt" / row)
        assert config.model.image.checkpoint == str(workdir / "towers" / "image")
        labels = flat(peft.make_labels(params, config.peft.recipe, config.peft.overrides))
        after = flat(params)
        mesh = sharding.make_mesh()
        before = flat(jax.device_get(initial_params(
            config, model, sharding.tree_shardings(params, mesh))))
        for path, value in after.items():
            if path in export:  # loaded: the row started from the exported tower ...
                np.testing.assert_array_equal(before[path], export[path], err_msg=path)
            if labels[path] == str(peft.FROZEN):  # ... and what the recipe froze never moved
                np.testing.assert_array_equal(value, before[path], err_msg=f"{row} {path}")
        moved = {p for p in after if not np.array_equal(after[p], before[p])}
        if row == "frozen":
            assert not moved
        else:
            assert moved and all(labels[p] == str(peft.TRAINABLE) for p in moved)
        if row == "lilt_lwa":
            assert any("adapter" in p for p in moved)
            assert not any("adapter" in p for p in export)  # fresh: not from the towers


def test_the_table_has_the_rows_and_the_ln_shift(papers):
    workdir, results = papers
    table = (workdir / "papers.md").read_text()
    for letter, row in (("a", "frozen"), ("d", "lilt_ln"), ("i", "lilt_lwa")):
        assert any(line.startswith(f"| ({letter}) ") and f"`{row}`" in line
                   for line in table.splitlines()), row
    assert "| frozen towers with fresh heads retrieve at chance" in table
    assert "| Fig. 4, LN-only alignment" in table
    assert json.loads((workdir / "results.json").read_text())["lilt"] == results["lilt"]
    by_row = {r["row"]: r for r in results["lilt"]}
    assert by_row["frozen"]["pearson_r"] == {"image": None, "text": None}  # nothing moved
    for tower in ("image", "text"):  # four layers: a Pearson r per tower
        assert -1 <= by_row["lilt_ln"]["pearson_r"][tower] <= 1
        assert len(by_row["lilt_ln"]["ln_l1"][tower]) == 4
    assert by_row["frozen"]["end"] == by_row["frozen"]["start"]
    assert (workdir / "lilt" / "lilt_ln" / "ln_shift.png").stat().st_size > 0
    assert results["timing"]["total"]["cpu_s"] > 0


def test_sail_heads_train_on_cached_features_of_the_pretrained_towers(papers):
    """Each alignment layer trains from the one shared cache, which the exported towers
    computed; its run holds the alignment layers and the logit scale and bias, no tower; put
    back on the exported towers, it classifies as it did from the cached features."""
    workdir, results = papers
    assert [h["head"] for h in results["sail"]] == list(HEADS)
    cache = workdir / "sail" / "feature_cache"
    for split in ("train", "eval"):
        manifest = json.loads((cache / split / "manifest.json").read_text())
        assert manifest["image_checkpoint"] == str(workdir / "towers" / "image")
        assert manifest["text_checkpoint"] == str(workdir / "towers" / "text")
    trainable = {}
    for h in results["sail"]:
        _, params, config = valign_jax.load_trained(workdir / "sail" / h["head"])
        assert config.model.image_head == config.model.text_head == h["head"]
        assert config.data.feature_cache == str(cache)
        assert set(params) <= {"visual_projection", "text_projection", "logit_scale",
                               "logit_bias"}, sorted(params)
        # the towers put back classify as their cached features did (one image of the 512
        # may flip on float rounding)
        zeroshot = "zeroshot/synthetic/top1"
        assert h["end_to_end"][zeroshot] == pytest.approx(h["cached"][zeroshot], abs=1 / 512)
        trainable[h["head"]] = h["trainable"]
    assert trainable["glu"] > trainable["linear"] > 0
    table = (workdir / "papers.md").read_text()
    for head in HEADS:
        assert any(line.startswith(f"| {head} |") for line in table.splitlines()), head
    assert "| GLU layers beat linear ones" in table
