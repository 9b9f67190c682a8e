"""Figures for notebooks and scripts: zero-shot predictions on their images, and a run's logged
curves.

    valign_jax.plot_predictions(data, result)      # last line of a notebook cell: shown there
    valign_jax.plot_metrics("/tmp/clip_demo").savefig("curves.png")

Each function returns a matplotlib Figure that a notebook shows as the cell's result (it
renders itself as PNG) and a script saves with `savefig`. Figures are drawn without pyplot, so
no window opens and no figure piles up in pyplot's list.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

RIGHT, WRONG = "tab:green", "tab:red"
# What `plot_metrics` draws by default: (panel title, y label, metric names or prefix/suffix).
DEFAULT_PANELS = (
    ("held-out retrieval and zero-shot", "accuracy",
     ("retrieval/i2t_r1", "retrieval/t2i_r1", "zeroshot/*/top1")),
    ("modality gap (centroid distance)", "distance", ("geometry/gap",)),
)


class ShownFigure(Figure):
    """A Figure that Jupyter displays as a PNG when it is a cell's result."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png")
        return buffer.getvalue()


def _figure(size) -> ShownFigure:
    fig = ShownFigure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_predictions(images, result, count: int = 16, columns: int = 8) -> Figure:
    """The first `count` images, each titled with its predicted class and that class's
    probability: green when it is the true class, red otherwise (the true class below).

    images: the ImageSet (or uint8 pixels) given to `zero_shot`; result: its ZeroShotResult.
    """
    pixels = np.asarray(getattr(images, "images", images))
    if len(pixels) != len(result.probs):
        raise ValueError(f"images: {len(pixels)} images, but the result classified "
                         f"{len(result.probs)}; pass the images given to zero_shot")
    if count < 1 or columns < 1:
        raise ValueError(f"count={count}, columns={columns}: both must be at least 1")
    shown = min(count, len(pixels))
    cols = min(shown, columns)
    rows = math.ceil(shown / cols)
    fig = _figure((2.2 * cols, 2.6 * rows))
    names, labels = result.class_names, result.labels
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i >= shown:
            continue
        ax.imshow(pixels[i])
        guess = int(result.predicted[i])
        title = f"{names[guess]} {result.probs[i, guess]:.0%}"
        color = "black"
        if labels is not None:
            right = guess == int(labels[i])
            color = RIGHT if right else WRONG
            title += "" if right else f"\n({names[int(labels[i])]})"
        ax.set_title(title, color=color, fontsize=9)
    fig.tight_layout()
    return fig


def logged_metrics(workdir) -> list[dict]:
    """The lines of <workdir>/metrics.jsonl: one dict per evaluation, with its "step". A line
    cut short by a killed run is left out."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a training workdir, "
                                f"or its run has not evaluated yet")
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a run killed mid-append; its resumed run writes that evaluation again
    return lines


def plot_metrics(workdir, keys: Sequence[str] | None = None) -> Figure:
    """The curves of a run's logged evaluations against the step: by default one panel of
    retrieval R@1 and zero-shot top-1, one of the modality gap; with `keys` (metric names,
    docs/metrics.md), one panel of those. A `*` in a name matches any dataset
    ("zeroshot/*/top1")."""
    logged = logged_metrics(workdir)
    if not logged:
        raise ValueError(f"{Path(workdir) / 'metrics.jsonl'} holds no evaluation yet")
    panels = DEFAULT_PANELS if keys is None else (("", "value", tuple(keys)),)
    known = sorted({k for line in logged for k in line if k != "step"})
    chosen = [(title, ylabel, _matching(patterns, known)) for title, ylabel, patterns in panels]
    if keys is not None and not chosen[0][2]:
        raise ValueError(f"keys {list(keys)}: none was logged in {workdir}; logged: {known}")
    chosen = [panel for panel in chosen if panel[2]]
    fig = _figure((5 * len(chosen), 3.5))
    for index, (title, ylabel, names) in enumerate(chosen):
        ax = fig.add_subplot(1, len(chosen), index + 1)
        for name in names:
            points = [(line["step"], line[name]) for line in logged if name in line]
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        if len(names) > 1 or keys is not None:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _matching(patterns, known) -> list[str]:
    """The logged names each pattern names, in the patterns' order ("*": one path part)."""
    out = []
    for pattern in patterns:
        if "*" not in pattern:
            out += [pattern] if pattern in known else []
            continue
        head, tail = pattern.split("*", 1)
        out += [k for k in known if k.startswith(head) and k.endswith(tail)
                and "/" not in k[len(head):len(k) - len(tail)]]
    return out
