"""LiLT's Table 1 in miniature: every row of configs/lilt.py, `demo,pretrained` (the pretrained
tiny towers, the embedded shapes), trained through the one loop into <workdir>/lilt/<row>, with
its held-out retrieval and zero-shot figures, its share of trained parameters and how far
training moved each LayerNorm (Fig. 4's Pearson r per tower).
"""

from __future__ import annotations

from pathlib import Path

import jax

from valign_jax import sharding, train
from valign_jax.evaluation import ln_shift, plots
from valign_jax.recipes import load_config
from valign_jax.run_setup import initial_params
from valign_jax.workdir import load_run

from papers.figures import LILT_TABLE_1
from papers.runs import CONFIGS, first_metrics, parameter_counts
from papers.timing import Timer

ROWS = tuple(LILT_TABLE_1)
RETRIEVAL = tuple(f"retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
ZEROSHOT = "zeroshot/synthetic/top1"


def row_config(row: str, steps: int | None = None):
    config = load_config(f"{CONFIGS}/lilt.py:{row},demo,pretrained")
    if steps:
        config.total_steps = steps
    # the start (chance for every row: fresh heads) and the end; no checkpoints between
    config.eval_every = config.checkpoint_every = config.total_steps
    return config


def run_row(workdir, row: str, steps: int | None = None) -> dict:
    """Train one row in <workdir>/lilt/<row> (a finished run is only read) and measure it."""
    row_dir = Path(workdir) / "lilt" / row
    with Timer() as timer:
        end = train.train_and_evaluate(row_config(row, steps), row_dir)
    start = first_metrics(row_dir)
    shift = layer_norm_shift(row_dir, plot=row == "lilt_ln")
    return {"row": row, "run": str(row_dir), "steps": end["step"],
            "trained_pct": parameter_counts(row_dir)[2],
            "start": {k: start[k] for k in RETRIEVAL + (ZEROSHOT,)},
            "end": {k: end[k] for k in RETRIEVAL + (ZEROSHOT,)},
            "pearson_r": {tower: r["pearson_r"] for tower, r in shift.items()},
            "ln_l1": {tower: r["l1"] for tower, r in shift.items()},
            **timer.figures()}


def layer_norm_shift(run_dir, plot: bool = False) -> dict:
    """ln_shift.ln_shift between the run's initial parameters (the pretrained towers, the
    fresh heads) and its last checkpoint; with `plot`, Fig. 4's panels beside the run."""
    model, params, _, config = load_run(run_dir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    param_sh = sharding.tree_shardings(params, mesh, config.mesh.min_fsdp_size)
    initial = jax.device_get(initial_params(config, model, param_sh))
    shift = ln_shift.ln_shift(initial, params)
    if plot:
        plots.ln_shift_plot(shift, Path(run_dir) / "ln_shift.png")
    return shift


def run(workdir, rows=ROWS, steps: int | None = None, log=print) -> list[dict]:
    results = []
    for row in rows:
        results.append(run_row(workdir, row, steps))
        r = results[-1]
        log(f"lilt {row}: t2i R@1 {r['end']['retrieval/t2i_r1']:.3f}, i2t R@1 "
            f"{r['end']['retrieval/i2t_r1']:.3f}, zero-shot {r['end'][ZEROSHOT]:.3f} "
            f"({r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU)")
    return results
