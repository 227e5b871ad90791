"""Everything a run shows: figures, overlay grids, confusion CSVs, tables (rich and markdown).

Figures are built with matplotlib's object API on the Agg canvas (no pyplot state, no display),
so they can be made in any thread or headless job; `tracking.Tracker.log_figure` saves them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image
from rich.table import Table

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


def sweep_figure(thresholds: Sequence[float], curves: Mapping[str, Sequence[float]], xlabel: str,
                 best: float | None = None) -> Figure:
    """Curves in % against a threshold (mIoU, ignored share, ...), the chosen threshold marked."""
    figure = _figure(5, 3.5)
    ax = figure.add_subplot()
    for (label, values), marker in zip(curves.items(), "os^v", strict=False):
        ax.plot(thresholds, np.asarray(values, dtype=np.float64) * 100, marker=marker, label=label)
    if best is not None:
        ax.axvline(best, color="tab:red", linestyle="--", label=f"best {best:.2f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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


def heat_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The image blended with a jet colouring of a [0, 1] map."""
    from matplotlib import colormaps

    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    return np.uint8(0.5 * image + 0.5 * colour)


def _tile(panel: np.ndarray, height: int) -> np.ndarray:
    """An HxWx3 picture (bilinear) or an HxW index mask (VOC colours, nearest) at `height` px."""
    h, w = panel.shape[:2]
    size = (max(1, round(w * height / h)), height)
    if panel.ndim == 2:
        return np.asarray(Image.fromarray(colorize(panel)).resize(size, Image.Resampling.NEAREST))
    return np.asarray(Image.fromarray(np.asarray(panel, np.uint8)).resize(size, Image.Resampling.BILINEAR))


def overlay_grid(rows: Sequence[Sequence[np.ndarray]], height: int = 160, gap: int = 4) -> np.ndarray:
    """One row per sample, e.g. image | ground truth | prediction: pictures and index masks, each
    scaled to `height` px and centred in a column as wide as the widest tile, so the columns line
    up under their titles; a row with fewer panels leaves its last columns white."""
    tiles = [[_tile(panel, height) for panel in row] for row in rows]
    width = max(t.shape[1] for row in tiles for t in row)
    columns = max(len(row) for row in tiles)
    grid = np.full((len(rows) * (height + gap) - gap, columns * width + (columns - 1) * gap, 3), 255, np.uint8)
    for r, strip in enumerate(tiles):
        for column, tile in enumerate(strip):
            left = column * (width + gap) + (width - tile.shape[1]) // 2
            grid[r * (height + gap):r * (height + gap) + height, left:left + tile.shape[1]] = tile
    return grid


def overlay_figure(rows: Sequence[Sequence[np.ndarray]], class_names: Sequence[str], height: int = 160,
                   gap: int = 4, columns: Sequence[str] = ("image", "ground truth", "prediction")) -> Figure:
    """`overlay_grid` at its own pixel size, with the column titles above it and, below it, the
    VOC colour of every class that appears in its masks (every panel after the image; 255 =
    ignored pixels)."""
    grid = overlay_grid(rows, height, gap)
    shown = np.unique(np.concatenate([np.unique(m) for row in rows for m in row[1:]]))
    names = {i: name for i, name in enumerate(class_names)} | {255: "ignored"}
    legend_columns = max(1, min(len(shown), grid.shape[1] // 120))
    top, bottom = 24, 16 + 20 * -(-len(shown) // legend_columns)  # px: titles; legend rows
    total = grid.shape[0] + top + bottom
    figure = Figure(figsize=(grid.shape[1] / 100, total / 100), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, bottom / total, 1, grid.shape[0] / total))  # the grid pixel for pixel
    ax.imshow(grid, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    width = (grid.shape[1] - (len(columns) - 1) * gap) / len(columns)
    for column, title in enumerate(columns):
        ax.text(column * (width + gap) + width / 2, -6, title, ha="center", va="bottom", fontsize=10)
    palette = voc_palette() / 255
    handles = [Patch(facecolor=palette[c], edgecolor="grey", label=names.get(int(c), str(c))) for c in shown]
    figure.legend(handles=handles, loc="lower center", ncol=legend_columns, frameon=False, fontsize=9,
                  handlelength=1.2, columnspacing=1.0)
    return figure


# ---- tables ------------------------------------------------------------------------------------
def table(columns: Sequence[str], rows: Iterable[Sequence[str]], title: str | None = None,
          left: int = 1) -> Table:
    """A rich table whose first `left` columns are text (left-aligned) and the rest numbers."""
    shown = Table(title=title, header_style="bold")
    for i, column in enumerate(columns):
        shown.add_column(column, justify="left" if i < left else "right")
    for row in rows:
        shown.add_row(*row)
    return shown


def markdown(shown: Table) -> str:
    """The same table as GitHub markdown, for results.md files logged beside the runs (a `|`
    inside a cell is escaped, or it would split the cell)."""
    def row(values) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    cells = [list(column.cells) for column in shown.columns]
    lines = [row(c.header for c in shown.columns), "|" + "---|" * len(shown.columns)]
    lines += [row(values) for values in zip(*cells, strict=True)]
    return "\n".join(lines) + "\n"


def confusion_csv(cm: np.ndarray, names: Sequence[str]) -> str:
    """Rows ground truth, columns prediction, both named."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["gt \\ pred", *names])
    writer.writerows([name, *row] for name, row in zip(names, np.asarray(cm).tolist(), strict=True))
    return buffer.getvalue()
