"""The `:demo` runs the README points newcomers to really learn: the full demo configs, unshrunk,
against the thresholds of the training-system issue (about 2½ minutes of CPU in all)."""

import json

import pytest

from valign_jax import train
from valign_jax.run_setup import load_config

from conftest import REPO


def run_demo(recipe, workdir):
    train.train_and_evaluate(load_config(f"{REPO}/configs/{recipe}.py:demo"), workdir)
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return lines[0], lines[-1]


@pytest.mark.parametrize("recipe,floor", [("clip", 0.2), ("siglip", 0.2), ("lilt", 0.1)])
def test_retrieval_rises_from_step_zero(recipe, floor, tmp_path):
    start, end = run_demo(recipe, tmp_path)
    assert start["step"] == 0
    for key in ("retrieval/t2i_r1", "retrieval/i2t_r1"):
        assert end[key] >= floor and end[key] >= 2 * start[key], (key, start[key], end[key])


def test_clip_refine_closes_the_gap_and_keeps_zero_shot(tmp_path):
    start, end = run_demo("clip_refine", tmp_path)
    assert end["geometry/gap"] <= 0.8 * start["geometry/gap"], (start, end)
    top1 = "zeroshot/synthetic/top1"
    assert end[top1] >= start[top1] - 0.02, (start[top1], end[top1])
