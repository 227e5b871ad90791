"""Figures: confusion heat map, per-class IoU bars, overlay grid, sweep curve, ablation chart.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot state, no display),
so they can be made in any thread or headless job; `tracking.Tracker.log_figure` saves them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from mcis_cli.data.transforms import voc_palette


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def confusion_figure(cm: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Row-normalised confusion matrix: row i shows where the pixels of class i went (recall)."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    side = max(4.0, 0.45 * n + 2)
    figure = _figure(side + 1, side)
    ax = figure.add_subplot()
    shown = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(shown, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if n <= 25:
        for i, j in zip(*np.nonzero(norm >= 0.005), strict=True):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black")
    return figure


def iou_figure(iou: dict[str, float], miou: float) -> Figure:
    """Per-class IoU bars with the mean as a line; absent classes (NaN) are shown empty."""
    names = list(iou)
    values = np.array([iou[c] for c in names], dtype=np.float64)
    figure = _figure(max(5.0, 0.4 * len(names) + 1.5), 4)
    ax = figure.add_subplot()
    ax.bar(range(len(names)), np.nan_to_num(values * 100), color="tab:blue")
    ax.axhline(miou * 100, color="tab:red", linestyle="--", label=f"mIoU {miou * 100:.1f}")
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU (%)")
    ax.legend(loc="upper right")
    return figure


def sweep_figure(thresholds: Sequence[float], mious: Sequence[float], best: float) -> Figure:
    """mIoU against the background threshold of localization maps."""
    figure = _figure(5, 3.5)
    ax = figure.add_subplot()
    ax.plot(thresholds, np.asarray(mious) * 100, marker="o")
    ax.axvline(best, color="tab:red", linestyle="--", label=f"best {best:.2f}")
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    ax.legend()
    return figure


def ablation_chart(scores: dict[str, dict[str, Sequence[float]]]) -> Figure:
    """Per metric a panel: mean mIoU per variant with its standard deviation over seeds, each seed
    as a dot. `scores[variant][metric]` holds one value per seed."""
    names = list(scores)
    metrics = list(next(iter(scores.values())))
    figure = _figure(4 * len(metrics) + 2, 0.45 * len(names) + 1.2)
    for column, metric in enumerate(metrics):
        ax = figure.add_subplot(1, len(metrics), column + 1)
        values = [100 * np.asarray(scores[n][metric], dtype=np.float64) for n in names]
        ax.barh(range(len(names)), [v.mean() for v in values], xerr=[v.std() for v in values],
                color="tab:blue", alpha=0.6, capsize=3)
        for row, v in enumerate(values):
            ax.plot(v, np.full(v.shape, row), "o", color="black", markersize=3)
        ax.set_yticks(range(len(names)), names if column == 0 else [])
        ax.invert_yaxis()  # first variant on top, as in the table
        ax.set_xlabel(f"{metric} mIoU (%), mean ± std")
    return figure


def colorize(mask: np.ndarray) -> np.ndarray:
    """HxW index mask -> HxWx3 uint8 in the VOC palette (255 = ignore in cream)."""
    return voc_palette()[np.asarray(mask, dtype=np.uint8)]


def overlay_grid(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], height: int = 160, gap: int = 4
) -> np.ndarray:
    """One row per sample: image | ground truth | prediction, each scaled to `height` px and
    centred in a column as wide as the widest tile, so the columns line up under their titles."""
    tiles = []
    for image, gt, pred in rows:
        h, w = gt.shape
        size = (max(1, round(w * height / h)), height)
        tiles.append([
            np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)),
            np.asarray(Image.fromarray(colorize(gt)).resize(size, Image.Resampling.NEAREST)),
            np.asarray(Image.fromarray(colorize(pred)).resize(size, Image.Resampling.NEAREST)),
        ])
    width = max(t[0].shape[1] for t in tiles)
    grid = np.full((len(rows) * (height + gap) - gap, 3 * width + 2 * gap, 3), 255, np.uint8)
    for row, strip in enumerate(tiles):
        for column, tile in enumerate(strip):
            left = column * (width + gap) + (width - tile.shape[1]) // 2
            grid[row * (height + gap):row * (height + gap) + height, left:left + tile.shape[1]] = tile
    return grid


COLUMNS = ("image", "ground truth", "prediction")


def overlay_figure(rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   class_names: Sequence[str], height: int = 160, gap: int = 4) -> Figure:
    """`overlay_grid` at its own pixel size, with the column titles above it and, below it, the
    VOC colour of every class that appears in its masks (255 = ignored pixels)."""
    grid = overlay_grid(rows, height, gap)
    shown = np.unique(np.concatenate([np.unique(m) for _, gt, pred in rows for m in (gt, pred)]))
    names = {i: name for i, name in enumerate(class_names)} | {255: "ignored"}
    columns = max(1, min(len(shown), grid.shape[1] // 120))
    top, bottom = 24, 16 + 20 * -(-len(shown) // columns)  # px: titles; legend rows
    total = grid.shape[0] + top + bottom
    figure = Figure(figsize=(grid.shape[1] / 100, total / 100), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, bottom / total, 1, grid.shape[0] / total))  # the grid pixel for pixel
    ax.imshow(grid, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    width = (grid.shape[1] - 2 * gap) / 3
    for column, title in enumerate(COLUMNS):
        ax.text(column * (width + gap) + width / 2, -6, title, ha="center", va="bottom", fontsize=10)
    palette = voc_palette() / 255
    handles = [Patch(facecolor=palette[c], edgecolor="grey", label=names.get(int(c), str(c))) for c in shown]
    figure.legend(handles=handles, loc="lower center", ncol=columns, frameon=False, fontsize=9,
                  handlelength=1.2, columnspacing=1.0)
    return figure
