"""What the papers' runs share: where the recipe files are, and what a finished run wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def parameter_counts(run_dir) -> tuple[int, int, float]:
    """(trainable, total, trainable %) from the report a run writes at its start."""
    text = (Path(run_dir) / "parameters.txt").read_text()
    found = re.search(r"trainable ([\d,]+) of ([\d,]+) \(([\d.]+)%\)", text)
    if not found:
        raise ValueError(f"{run_dir}/parameters.txt has no 'trainable N of M (P%)' line")
    return (int(found.group(1).replace(",", "")), int(found.group(2).replace(",", "")),
            float(found.group(3)))


def first_metrics(run_dir) -> dict:
    """The run's first evaluation (step 0)."""
    return json.loads((Path(run_dir) / "metrics.jsonl").read_text().splitlines()[0])
