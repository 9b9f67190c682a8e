"""The miniature's pretrained towers: the two unimodal stages of configs/pretrain.py, trained
through the one training loop, then exported as Hugging Face tower directories that the
`pretrained` modifier of configs/lilt.py and configs/sail.py loads.

    <workdir>/pretrain/image, <workdir>/pretrain/text   the stages' training runs
    <towers>/image, <towers>/text                        the exported towers (+ the tokenizer)
    <towers>/towers.json                                 where they came from, how good they are
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import valign_jax
from valign_jax import hf, train
from valign_jax.data import synthetic
from valign_jax.models.registry import tower_for
from valign_jax.recipes import load_config

from papers.runs import CONFIGS, first_metrics
from papers.timing import Timer

STAGES = {"image": "vision_model", "text": "text_model"}  # stage: the tower it trains
HELDOUT = {"image": "heldout/accuracy", "text": "heldout/mlm_accuracy"}


def stage_config(side: str, steps: int | None = None):
    config = load_config(f"{CONFIGS}/pretrain.py:{side}")
    if steps:
        config.total_steps = steps
        config.eval_every = config.checkpoint_every = max(steps // 2, 1)
    return config


def pretrain(workdir, towers, steps: int | None = None) -> dict:
    """Train both stages in <workdir>/pretrain (a finished stage is not trained again) and
    export their towers to `towers`; {side: {metrics, timings}}. `steps`: fewer steps (tests)."""
    workdir, towers = Path(workdir), Path(towers)
    report = {}
    for side in STAGES:
        stage_dir = workdir / "pretrain" / side
        with Timer() as timer:
            metrics = train.train_and_evaluate(stage_config(side, steps), stage_dir)
        export(stage_dir, side, towers / side)
        first = first_metrics(stage_dir)
        report[side] = {"run": str(stage_dir), "config": f"configs/pretrain.py:{side}",
                        "steps": metrics["step"], "heldout_metric": HELDOUT[side],
                        "heldout_start": first[HELDOUT[side]],
                        "heldout_end": metrics[HELDOUT[side]], **timer.figures()}
    (towers / "towers.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def export(stage_dir, side: str, out) -> Path:
    """The tower a stage trained, as a Hugging Face directory (the text tower with the
    embedded data's tokenizer), replacing `out` whole: a reader never sees half a tower."""
    model, params, _ = valign_jax.load_trained(stage_dir)
    config = model.image_config if side == "image" else model.text_config
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_tower(tower_for(config), params[STAGES[side]], staging, formats=("safetensors",))
        if side == "text":
            synthetic.save_hf_tokenizer(staging)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
