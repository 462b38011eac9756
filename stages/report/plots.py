"""The report's plots: PCK against alpha, per-pair error histograms, per-category bars and sweeps, as PNGs.

Each function draws one matplotlib Figure on its own Agg canvas (no pyplot, no global state) of
``FIGSIZE`` inches at ``DPI``, so every PNG is ``PIXELS`` (width, height) pixels, and writes it atomically.
Values in [0, 1] are plotted in percent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.cache import atomic_path

FIGSIZE = (8.0, 4.5)
DPI = 100
PIXELS = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
HISTOGRAM_BINS = np.linspace(0.0, 1.0, 21)


def _figure(title: str) -> tuple[Figure, Axes]:
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    return figure, axes


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def _line_style(method: str) -> str:
    return "-" if method == "gwot" else "--"


def plot_pck_curves(curves: pd.DataFrame, *, title: str, marker_alpha: float, path: str | Path) -> Path:
    """PCK (percent) against alpha, one line per setting (``matcher``; dashed unless GWOT), from
    rows ``setting``, ``matcher``, ``method``, ``alpha``, ``pck`` of one dataset; a dotted vertical
    line marks ``marker_alpha``. Writes the PNG at ``path`` and returns it."""
    figure, axes = _figure(title)
    for (_, label, method), rows in curves.groupby(["setting", "matcher", "method"], sort=True):
        axes.plot(rows["alpha"], 100 * rows["pck"], _line_style(method), label=label, linewidth=1.5)
    axes.axvline(marker_alpha, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("alpha (correct: error <= alpha x reference length)")
    axes.set_ylabel("PCK per keypoint (%)")
    axes.set_ylim(0, 100)
    axes.set_xlim(curves["alpha"].min(), curves["alpha"].max())
    axes.legend(fontsize=8, loc="lower right")
    return _save(figure, path)


def plot_error_histograms(errors: Mapping[str, np.ndarray], *, title: str, xlabel: str, path: str | Path) -> Path:
    """Overlaid histograms of per-pair errors in [0, 1] (e.g. ``1 - PCK@0.1`` of each pair [P]), one per
    setting label, in ``HISTOGRAM_BINS``; the legend gives each mean. Writes the PNG and returns ``path``."""
    figure, axes = _figure(title)
    for label, values in errors.items():
        values = np.asarray(values, dtype=np.float64)
        axes.hist(
            values,
            bins=HISTOGRAM_BINS,
            alpha=0.5,
            label=f"{label} (mean {values.mean():.2f}, {len(values)} pairs)",
        )
    axes.set_xlabel(xlabel)
    axes.set_ylabel("pairs")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlim(0, 1)
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_grouped_bars(
    table: pd.DataFrame, *, group: str, value: str, title: str, ylabel: str, path: str | Path
) -> Path:
    """Bars of ``value`` (a fraction, plotted in percent) for each ``group`` value on the x axis, one bar
    per setting (``matcher``) side by side. Writes the PNG at ``path`` and returns it."""
    figure, axes = _figure(title)
    groups = sorted(table[group].unique(), key=str)
    labels = sorted(table["matcher"].unique())
    width = 0.8 / len(labels)
    positions = np.arange(len(groups))
    for index, label in enumerate(labels):
        rows = table[table["matcher"] == label].set_index(group)[value]
        heights = [100 * rows.get(name, np.nan) for name in groups]
        axes.bar(positions + (index - (len(labels) - 1) / 2) * width, heights, width, label=label)
    rotated = len(groups) > 6  # long category lists (SPair's 18) stay readable at an angle
    names = [str(name) for name in groups]
    axes.set_xticks(positions, names, rotation=45 if rotated else 0, ha="right" if rotated else "center")
    axes.set_ylabel(ylabel)
    axes.set_ylim(0, 100)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)


def plot_sweep(table: pd.DataFrame, parameter: str, others: Sequence[str], *, title: str, path: str | Path) -> Path:
    """PCK (percent, per image and per keypoint) against the values of ``parameter``, one pair of lines
    per combination of the ``others`` swept parameters (one line where both averagings agree). Values are
    placed evenly on the x axis in sorted order (so ``inf`` and booleans plot too). Writes the PNG at
    ``path`` and returns it."""
    figure, axes = _figure(title)
    values = sorted(table[parameter].unique())
    where = {value: index for index, value in enumerate(values)}
    lines = table.groupby(list(others), sort=True) if others else [((), table)]
    for keys, rows in lines:
        keys = keys if isinstance(keys, tuple) else (keys,)
        name = ", ".join(f"{other}={key}" for other, key in zip(others, keys, strict=True))
        rows = rows.sort_values(parameter)
        x = [where[value] for value in rows[parameter]]
        if np.allclose(rows["per_image"], rows["per_keypoint"]):  # one line, not the same line twice
            axes.plot(x, 100 * rows["per_image"], "o-", label=f"{name} per image = per keypoint".strip())
            continue
        for column, style in (("per_image", "o-"), ("per_keypoint", "s--")):
            label = f"{name} {column.replace('_', ' ')}".strip()
            axes.plot(x, 100 * rows[column], style, label=label)
    axes.set_xticks(range(len(values)), [str(value) for value in values])
    axes.set_xlabel(parameter)
    axes.set_ylabel("PCK (%)")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)


def plot_pair_scatter(
    x: np.ndarray, y: np.ndarray, *, x_label: str, y_label: str, title: str, path: str | Path
) -> Path:
    """One point per pair: its PCK (fractions, plotted in %) under setting ``x_label`` against ``y_label``,
    the diagonal drawn, points darker where several coincide; the legend counts the pairs above, below and
    on the diagonal. Writes the PNG at ``path`` and returns it."""
    x, y = 100 * np.asarray(x, dtype=np.float64), 100 * np.asarray(y, dtype=np.float64)
    figure, axes = _figure(title)
    axes.plot([0, 100], [0, 100], color="grey", linestyle=":", linewidth=1)
    above, below = int((y > x).sum()), int((y < x).sum())
    counts = f"{y_label} better on {above}, {x_label} on {below}, equal on {len(x) - above - below} pairs"
    axes.scatter(x, y, s=18, alpha=0.35, edgecolors="none", label=counts)
    axes.set_xlabel(f"{x_label}: PCK of a pair (%)")
    axes.set_ylabel(f"{y_label}: PCK of a pair (%)")
    axes.set_xlim(-2, 102)
    axes.set_ylim(-2, 102)
    axes.set_aspect("equal")
    axes.legend(fontsize=8, loc="lower right")
    return _save(figure, path)


def plot_sweep_heatmap(
    table: pd.DataFrame, rows: str, columns: str, value: str, *, title: str, path: str | Path
) -> Path:
    """A 2-D sweep as a heatmap: ``value`` (a fraction, shown in % in each cell) of every combination of
    parameters ``rows`` (y axis) and ``columns`` (x axis), values in sorted order; a missing combination is
    blank. Writes the PNG at ``path`` and returns it."""
    grid = table.pivot_table(index=rows, columns=columns, values=value, aggfunc="first").sort_index().sort_index(axis=1)
    figure, axes = _figure(title)
    axes.grid(False)
    image = axes.imshow(100 * grid.to_numpy(dtype=float), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), cell in np.ndenumerate(grid.to_numpy(dtype=float)):
        if not np.isnan(cell):
            colour = "black" if cell > 0.6 else "white"  # readable on viridis' light and dark ends
            axes.text(j, i, f"{100 * cell:.1f}", ha="center", va="center", fontsize=9, color=colour)
    axes.set_xticks(range(grid.shape[1]), [str(v) for v in grid.columns])
    axes.set_yticks(range(grid.shape[0]), [str(v) for v in grid.index])
    axes.set_xlabel(columns)
    axes.set_ylabel(rows)
    figure.colorbar(image, ax=axes, label=f"PCK {value.replace('_', ' ')} (%)")
    return _save(figure, path)
