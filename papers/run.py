"""The papers' findings in miniature, offline: pretrain tiny towers, then LiLT's Table 1 and
SAIL's head comparison on them, each beside the paper's figures.

    python -m papers.run all --workdir=DIR          # about 30 minutes on 2 CPU cores
    python -m papers.run pretrain --workdir=DIR     # only the towers
    python -m papers.run lilt --workdir=DIR [--rows=frozen,lilt_ln,lilt_lwa]
    python -m papers.run sail --workdir=DIR

`lilt` and `sail` pretrain the towers first unless they are there (--towers, default
$VALIGN_JAX_PRETRAINED_TOWERS or ~/.cache/valign_jax/pretrained_towers: where the `pretrained`
modifier of configs/lilt.py and configs/sail.py finds them). Every run goes through the one
training loop into DIR (rerunning resumes; a finished run is only measured again); the tables
go to DIR/papers.md and the figures behind them to DIR/results.json, with wall-clock and CPU
time per stage and the machine's load while they ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

from papers import lilt, report, sail, towers
from papers.timing import LoadSampler, Timer

COMMANDS = ("pretrain", "lilt", "sail", "all")


def run(command: str, workdir, towers_dir=None, rows=lilt.ROWS, heads=sail.HEADS,
        steps: dict | None = None, log=print) -> dict:
    """Run `command` into `workdir`; returns results.json's content (also written, with
    papers.md). `steps`: {"pretrain", "lilt", "sail": steps} to shorten the runs (tests)."""
    from valign_jax import recipes
    if command not in COMMANDS:
        raise ValueError(f"command {command!r}; expected one of {COMMANDS}")
    workdir = Path(workdir)
    towers_dir = Path(towers_dir or recipes.pretrained_towers_dir()).absolute()
    os.environ[recipes.PRETRAINED_TOWERS_ENV] = str(towers_dir)  # the `pretrained` modifier's
    steps = steps or {}
    results = {"command": command, "workdir": str(workdir), "towers_dir": str(towers_dir),
               "towers": None, "towers_trained": False,
               "when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    stages = {}
    with LoadSampler() as load, Timer() as total:
        if command == "pretrain" or not _towers_present(towers_dir):
            with Timer() as t:
                results["towers"] = towers.pretrain(workdir, towers_dir, steps.get("pretrain"))
            results["towers_trained"] = True
            stages["pretraining (both towers)"] = t.figures()
        else:
            results["towers"] = json.loads((towers_dir / "towers.json").read_text())
        if command in ("lilt", "all"):
            with Timer() as t:
                results["lilt"] = lilt.run(workdir, rows, steps.get("lilt"), log)
            stages[f"LiLT, {len(rows)} rows"] = t.figures()
        if command in ("sail", "all"):
            with Timer() as t:
                results["sail"] = sail.run(workdir, heads, steps.get("sail"), log)
            stages[f"SAIL, {len(heads)} heads (the feature cache included)"] = t.figures()
    results["timing"] = {"stages": stages, "total": total.figures(), "load": load.summary()}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (workdir / "papers.md").write_text(report.markdown(results))
    log(f"wrote {workdir / 'papers.md'} and {workdir / 'results.json'}")
    return results


def _towers_present(directory: Path) -> bool:
    return all((directory / side / "config.json").is_file() for side in towers.STAGES) and (
        directory / "towers.json").is_file()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m papers.run", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--workdir", required=True, help="where the runs and tables go")
    parser.add_argument("--towers", default=None, help="the pretrained towers' directory")
    parser.add_argument("--rows", default=",".join(lilt.ROWS),
                        help="LiLT rows (configs/lilt.py variants), comma-separated")
    parser.add_argument("--heads", default=",".join(sail.HEADS),
                        help="SAIL alignment layers, comma-separated")
    args = parser.parse_args(argv)
    rows = tuple(r for r in args.rows.split(",") if r)
    unknown = sorted(set(rows) - set(lilt.ROWS))
    if unknown:
        parser.error(f"--rows: unknown rows {unknown}; known: {list(lilt.ROWS)}")
    heads = tuple(h for h in args.heads.split(",") if h)
    if set(heads) - set(sail.HEADS):
        parser.error(f"--heads: expected some of {list(sail.HEADS)}")
    run(args.command, args.workdir, args.towers, rows, heads)


if __name__ == "__main__":
    main()
