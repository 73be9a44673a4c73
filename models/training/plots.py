"""Pictures a person would rather look at than numbers: genuine vs impostor distance histograms per panel.

matplotlib's figure API with the Agg canvas, as ``models.evaluation.scoring.plot_roc`` does: no pyplot, no global
backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from models.errors import TrainingError


@dataclass(frozen=True, eq=False)
class HistogramPanel:
    title: str
    genuine: ArrayLike
    impostor: ArrayLike
    xlabel: str = "distance"
    # vertical lines: label -> x (e.g. "threshold @ FAR 1e-3")
    marks: Mapping[str, float] = field(default_factory=dict)
    band: tuple[float, float] | None = None  # a shaded interval, e.g. the threshold's bootstrap interval


def plot_histograms(panels: Sequence[HistogramPanel], path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise TrainingError("nothing to plot")
    fig = Figure(figsize=(5.5 * len(panels), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        g = np.asarray(panel.genuine, dtype=np.float64)
        i = np.asarray(panel.impostor, dtype=np.float64)
        both = np.r_[g, i]
        both = both[np.isfinite(both)]
        bins = np.linspace(float(both.min()), float(both.max()), 50) if both.size else 10
        ax.hist(g[np.isfinite(g)], bins=bins, density=True, alpha=0.55, label=f"genuine ({g.size})")
        ax.hist(i[np.isfinite(i)], bins=bins, density=True, alpha=0.55, label=f"impostor ({i.size})")
        if panel.band is not None:
            ax.axvspan(*panel.band, color="grey", alpha=0.25, label="bootstrap interval")
        for k, (label, x) in enumerate(panel.marks.items()):
            ax.axvline(x, color=f"C{k + 2}", linestyle="--", label=f"{label} ({x:.3f})")
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel="density")
        ax.legend(loc="upper right", fontsize="small")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
