"""SAIL's Table 1 in miniature: linear, MLP and GLU alignment layers trained on the same frozen
pretrained tiny towers (configs/sail.py:demo,pretrained), from one feature cache the three runs
share, each in <workdir>/sail/<head>.

A run that trains from cached features evaluates on cached features (retrieval, and zero-shot
from the prompts' cached text features). Each trained run is also evaluated end to end: the
towers loaded from their checkpoints, the run's alignment layers and logit scale and bias laid
over them, then retrieval and zero-shot on raw images and prompts. The table shows these; the
cached evaluation's figures stay in results.json (`cached`). The two zero-shot figures agree
(the same towers classify the same images); retrieval differs a little, since the cache keeps
up to five captions per image (its max_captions) and the raw split has six.
"""

from __future__ import annotations

from pathlib import Path

import jax

from valign_jax import sharding, train
from valign_jax.evaluation.build import make_evaluator
from valign_jax.models.layout import abstract_params, overlay
from valign_jax.recipes import load_config
from valign_jax.run_setup import build_model, initial_params, input_setup
from valign_jax.workdir import load_run

from papers.runs import CONFIGS, first_metrics, parameter_counts
from papers.timing import Timer

HEADS = ("linear", "mlp", "glu")
TRAINED = ("visual_projection", "text_projection", "logit_scale", "logit_bias")
ZEROSHOT = "zeroshot/synthetic/top1"


def head_config(head: str, cache, steps: int | None = None):
    config = load_config(f"{CONFIGS}/sail.py:demo,pretrained")
    config.model.image_head = config.model.text_head = head
    config.data.feature_cache = str(Path(cache).absolute())  # one cache for the three heads
    if steps:
        config.total_steps = steps
    config.eval_every = config.checkpoint_every = config.total_steps
    return config


def end_to_end(run_dir) -> dict:
    """Retrieval and zero-shot of a cached-feature run with its towers put back."""
    _, trained, _, config = load_run(run_dir)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.feature_cache = ""
    model = build_model(config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    param_sh = sharding.tree_shardings(abstract_params(model), mesh, config.mesh.min_fsdp_size)
    towers = jax.device_get(initial_params(config, model, param_sh))
    params = sharding.put(overlay(towers, {k: trained[k] for k in TRAINED if k in trained}),
                          param_sh)
    size, collate = input_setup(config, model)
    return make_evaluator(config, model, mesh, param_sh, collate, size)(params)


def run_head(workdir, head: str, steps: int | None = None) -> dict:
    run_dir = Path(workdir) / "sail" / head
    with Timer() as timer:
        cached = train.train_and_evaluate(
            head_config(head, Path(workdir) / "sail" / "feature_cache", steps), run_dir)
    start = first_metrics(run_dir)
    full = end_to_end(run_dir)
    return {"head": head, "run": str(run_dir), "steps": cached["step"],
            "trainable": parameter_counts(run_dir)[0],
            "start": {k: start[k] for k in ("retrieval/t2i_r1", "retrieval/i2t_r1")},
            "cached": {k: cached[k] for k in ("retrieval/t2i_r1", "retrieval/i2t_r1", ZEROSHOT)
                       if k in cached},
            "end_to_end": {k: full[k] for k in ("retrieval/t2i_r1", "retrieval/i2t_r1",
                                                ZEROSHOT)},
            **timer.figures()}


def run(workdir, heads=HEADS, steps: int | None = None, log=print) -> list[dict]:
    results = []
    for head in heads:
        results.append(run_head(workdir, head, steps))
        r = results[-1]
        log(f"sail {head}: t2i R@1 {r['end_to_end']['retrieval/t2i_r1']:.3f}, i2t R@1 "
            f"{r['end_to_end']['retrieval/i2t_r1']:.3f}, zero-shot "
            f"{r['end_to_end'][ZEROSHOT]:.3f} ({r['wall_s']:.0f} s wall)")
    return results
