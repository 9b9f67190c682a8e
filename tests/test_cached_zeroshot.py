"""Zero-shot in a run that trains from cached features (SAIL): the frozen towers encode the
zero-shot images and class prompts once, beside the training cache; every evaluation reports
zero-shot; and it equals what `evaluate --towers` computes with the real towers under the
run's trained heads."""

import json

import pytest

from valign_jax import evaluate, frozen_towers, train
from valign_jax.recipes import eval_entry

from test_evaluate import run_cli
from train_helpers import tiny_config

TOP = ("zeroshot/synthetic/top1", "zeroshot/synthetic/top5",
       "zeroshot/synthetic/mean_per_class_recall")


@pytest.fixture(scope="module")
def sail_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sail_run")
    config = tiny_config("sail", steps=4)
    config.eval_every = config.checkpoint_every = 2
    config.data.num_eval = 48  # enough images for zero-shot to tell models apart
    config.evals.relations = eval_entry("compositional", data="synthetic:relations",
                                        num_groups=4)
    train.train_and_evaluate(config, workdir)
    return workdir


def logged(workdir):
    return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_every_evaluation_reports_zero_shot_and_it_equals_the_towers_end_to_end(
        sail_run, tmp_path):
    lines = logged(sail_run)
    assert [m["step"] for m in lines] == [0, 2, 4]
    for m in lines:
        assert set(TOP) <= set(m), m
        assert "compositional/relations/accuracy" in m   # other evaluators work the same way
    assert lines[0]["zeroshot/synthetic/top5"] != lines[-1]["zeroshot/synthetic/top5"] or \
        lines[0]["zeroshot/synthetic/top1"] != lines[-1]["zeroshot/synthetic/top1"]
    keys = (*TOP, "compositional/relations/accuracy", "compositional/relations/group")
    # step 2 here, the latest (4) through the command line
    end_to_end = evaluate.evaluate(workdir=sail_run, step=2, towers=True,
                                   out=tmp_path / "towers_2.json")["metrics"]
    for key in keys:
        assert end_to_end[key] == pytest.approx(lines[1][key], abs=1e-5), key
    out = tmp_path / "cli.json"
    proc = run_cli(f"--workdir={sail_run}", "--towers", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["step"] == 4
    for key in keys:
        assert result["metrics"][key] == pytest.approx(lines[2][key], abs=1e-5), key


def test_the_cached_prompts_and_images_are_read_back_not_recomputed(sail_run, tmp_path,
                                                                    monkeypatch):
    sets = sorted((sail_run / "feature_cache/sets").iterdir())
    kinds = {json.loads((s / "manifest.json").read_text())["kind"] for s in sets}
    assert kinds == {"images", "texts"} and all((s / "features.npy").is_file() for s in sets)

    def no_towers(self):
        raise AssertionError("the towers ran although every set is cached")
    monkeypatch.setattr(frozen_towers.TowerFeatures, "_load", no_towers)
    metrics = evaluate.evaluate(workdir=sail_run, out=tmp_path / "cached.json")["metrics"]
    assert metrics["zeroshot/synthetic/top1"] == pytest.approx(
        logged(sail_run)[-1]["zeroshot/synthetic/top1"], abs=1e-6)

    # A set made under other tower settings is refused with the key named.
    prompts = next(s for s in sets if "texts" in s.name)
    manifest = json.loads((prompts / "manifest.json").read_text())
    (prompts / "manifest.json").write_text(json.dumps({**manifest, "text_pooling": "cls"}))
    try:
        with pytest.raises(ValueError, match="text_pooling: cache has 'cls'"):
            evaluate.evaluate(workdir=sail_run, out=tmp_path / "stale.json")
    finally:
        (prompts / "manifest.json").write_text(json.dumps(manifest))


def test_towers_needs_a_cached_run(tmp_path):
    with pytest.raises(ValueError, match="--towers: .* did not train from cached features"):
        evaluate._with_towers(tmp_path, {}, tiny_config("clip"))
