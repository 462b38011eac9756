"""Pictures of matches: keypoint correspondences between two images, and a source warped by a dense flow.

Pictures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend change) and
written as PNG files whose pixels map one to one onto the composed images: the figure is exactly the size
of the composition, so a point's place in the picture is known to the pixel (tests rely on it).
Points follow the pixel-centre convention of :mod:`stages.features.canvas`: pixel (col, row) has its
centre at (col, row), and resizing by ``s`` maps ``x`` to ``(x + 0.5) * s - 0.5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from pipeline.cache import atomic_path
from pipeline.errors import PipelineError
from stages.datasets.flo import flow_validity

MAX_HEIGHT = 1024  # default common height cap: a pair of phone photos still gives a picture of a few MB
GAP = 8  # white pixels between the two images
DPI = 100
LINE_PX = 2.0  # line width in picture pixels
CORRECT_COLOUR = (0.0, 0.8, 0.0)
WRONG_COLOUR = (0.9, 0.0, 0.0)
WARP_LABELS = ("source warped by the flow", "target")


@dataclass(frozen=True)
class Panel:
    """Where an image sits in a picture: resized by ``(scale_x, scale_y)``, moved right by ``left`` pixels."""

    left: int
    scale_x: float
    scale_y: float

    def place(self, points: np.ndarray) -> np.ndarray:
        """Original-image points [K, 2] (x, y) -> picture pixel coordinates [K, 2]."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return np.stack(
            [
                (points[:, 0] + 0.5) * self.scale_x - 0.5 + self.left,
                (points[:, 1] + 0.5) * self.scale_y - 0.5,
            ],
            axis=1,
        )


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PipelineError(f"{what} must be an [H, W, 3] uint8 RGB image, got {image.dtype} {list(image.shape)}")
    return image


def _resize_to_height(image: np.ndarray, height: int) -> np.ndarray:
    """``image`` resized (Lanczos, aspect ratio kept) to ``height`` rows; unchanged when already that tall."""
    if image.shape[0] == height:
        return image
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))


def side_by_side(
    src_image: np.ndarray, trg_image: np.ndarray, height: int | None = None
) -> tuple[np.ndarray, Panel, Panel]:
    """The two images resized to a common ``height`` (default: the taller one's, at most ``MAX_HEIGHT``)
    and put side by side with a white gap: the picture [height, W, 3] uint8 and each image's panel."""
    src_image = _check_image(src_image, "the source image")
    trg_image = _check_image(trg_image, "the target image")
    height = height or min(max(src_image.shape[0], trg_image.shape[0]), MAX_HEIGHT)
    src_resized, trg_resized = _resize_to_height(src_image, height), _resize_to_height(trg_image, height)
    gap = np.full((height, GAP, 3), 255, np.uint8)
    picture = np.concatenate([src_resized, gap, trg_resized], axis=1)
    panels = tuple(
        Panel(left=left, scale_x=resized.shape[1] / image.shape[1], scale_y=height / image.shape[0])
        for left, resized, image in (
            (0, src_resized, src_image),
            (src_resized.shape[1] + GAP, trg_resized, trg_image),
        )
    )
    return picture, panels[0], panels[1]


def _axes_on(picture: np.ndarray) -> tuple[Figure, Axes]:
    """A figure exactly the picture's size in pixels, showing it with one data unit per pixel."""
    height, width = picture.shape[:2]
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    axes.imshow(picture, interpolation="nearest")
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_axis_off()
    return figure, axes


def _label(axes: Axes, text: str, x: float, y: float, *, ha: str = "left", va: str = "top") -> None:
    """White text on a dark box at picture pixel (x, y), sized to the picture's height."""
    picture_height = axes.get_ylim()[0] + 0.5
    axes.text(
        x,
        y,
        text,
        color="white",
        fontsize=max(6.0, picture_height / 45),
        ha=ha,
        va=va,
        bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 2},
    )


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG at ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def _point_colours(n_points: int, correct: np.ndarray | None) -> np.ndarray:
    """[K, 3] RGB: green/red by ``correct``, else evenly spaced hues."""
    if correct is not None:
        return np.where(correct[:, None], CORRECT_COLOUR, WRONG_COLOUR)
    return matplotlib.colormaps["hsv"](np.linspace(0.0, 1.0, n_points, endpoint=False))[:, :3]


def _as_points(points: np.ndarray, what: str, n_points: int | None = None) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or (n_points is not None and len(points) != n_points):
        expected = f"[{n_points if n_points is not None else 'K'}, 2]"
        raise PipelineError(f"{what} must be {expected} (x, y), got shape {list(points.shape)}")
    return points


def correspondence_figure(
    src_image: np.ndarray,
    trg_image: np.ndarray,
    src_points: np.ndarray,
    pred_points: np.ndarray,
    *,
    true_points: np.ndarray | None = None,
    correct: Sequence[bool] | np.ndarray | None = None,
    title: str | None = None,
    height: int | None = None,
) -> Figure:
    """Source keypoints joined to their predicted target points, as a matplotlib Figure (no pyplot).

    Images ``[H, W, 3]`` uint8 are shown side by side at a common ``height`` (see :func:`side_by_side`);
    points ``[K, 2]`` (x, y) are in original pixels of their image. A line is green where ``correct [K]``
    is true and red where false, or has a hue of its own without ``correct``; ``true_points [K, 2]`` are
    drawn as hollow circles in the line's colour.
    """
    src_points = _as_points(src_points, "src_points")
    n_points = len(src_points)
    pred_points = _as_points(pred_points, "pred_points", n_points)
    if correct is not None:
        correct = np.asarray(correct, dtype=bool).reshape(-1)
        if len(correct) != n_points:
            raise PipelineError(f"correct must have one flag per point ({n_points}), got {len(correct)}")
    picture, src_panel, trg_panel = side_by_side(src_image, trg_image, height)
    colours = _point_colours(n_points, correct)
    figure, axes = _axes_on(picture)
    points_size = (LINE_PX * 72 / DPI) ** 2  # scatter sizes are in points^2; one marker unit = LINE_PX
    starts, ends = src_panel.place(src_points), trg_panel.place(pred_points)
    for start, end, colour in zip(starts, ends, colours, strict=True):
        axes.plot([start[0], end[0]], [start[1], end[1]], color=colour, linewidth=LINE_PX * 72 / DPI)
    for places in (starts, ends):
        axes.scatter(places[:, 0], places[:, 1], s=9 * points_size, c=colours, edgecolors="white", linewidths=0.5)
    if true_points is not None:
        truth = trg_panel.place(_as_points(true_points, "true_points", n_points))
        axes.scatter(truth[:, 0], truth[:, 1], s=36 * points_size, facecolors="none", edgecolors=colours)
    if title:
        _label(axes, title, 4, 4)
    return figure


def draw_correspondences(
    src_image: np.ndarray,
    trg_image: np.ndarray,
    src_points: np.ndarray,
    pred_points: np.ndarray,
    *,
    path: str | Path,
    **options: Any,
) -> Path:
    """:func:`correspondence_figure` (``options``: its keyword arguments) written as a PNG at ``path``, its
    pixels one to one with the composed images; returns ``path``."""
    return save_png(correspondence_figure(src_image, trg_image, src_points, pred_points, **options), path)


def forward_warp(src_image: np.ndarray, flow: np.ndarray, trg_height: int, trg_width: int) -> np.ndarray:
    """Splat each source pixel onto the target grid at ``p + flow[p]`` rounded to the nearest pixel.

    ``src_image [Hs, Ws, 3]`` uint8, ``flow [Hs, Ws, 2]`` (src -> trg, TSS convention: ``p_trg = p_src +
    flow[p_src]``; unknown vectors, ``|u|`` or ``|v|`` > 1e9 or NaN, are skipped). Returns the warped
    source ``[trg_height, trg_width, 3]`` uint8: target pixels no source pixel reaches (where the flow
    stretches, or outside its image) stay black; where several land, the last in row-major order wins.
    """
    src_image = _check_image(src_image, "the source image")
    flow = np.asarray(flow, dtype=np.float64)
    if flow.shape != (*src_image.shape[:2], 2):
        expected = [*src_image.shape[:2], 2]
        raise PipelineError(f"flow must be [Hs, Ws, 2] = {expected} for the source image, got {list(flow.shape)}")
    rows, cols = np.mgrid[0 : src_image.shape[0], 0 : src_image.shape[1]]
    valid = flow_validity(flow)
    x = np.rint(cols[valid] + flow[valid][:, 0]).astype(np.int64)
    y = np.rint(rows[valid] + flow[valid][:, 1]).astype(np.int64)
    inside = (x >= 0) & (x < trg_width) & (y >= 0) & (y < trg_height)
    warped = np.zeros((trg_height, trg_width, 3), np.uint8)
    warped[y[inside], x[inside]] = src_image[valid][inside]
    return warped


def draw_warp(
    src_image: np.ndarray,
    trg_image: np.ndarray,
    flow: np.ndarray,
    *,
    title: str | None = None,
    path: str | Path,
) -> Path:
    """The source forward-warped onto the target by ``flow [Hs, Ws, 2]`` (src -> trg, see
    :func:`forward_warp`: holes stay black) beside the target; write a PNG at ``path`` and return it.

    Both halves have the target's size (scaled down together to at most ``MAX_HEIGHT`` rows), so a
    well-predicted flow shows the same content at the same place in each half.
    """
    trg_image = _check_image(trg_image, "the target image")
    warped = forward_warp(src_image, flow, *trg_image.shape[:2])
    picture, warped_panel, trg_panel = side_by_side(warped, trg_image)
    figure, axes = _axes_on(picture)
    for panel, text in zip((warped_panel, trg_panel), WARP_LABELS, strict=True):
        _label(axes, text, panel.left + 4, 4)
    if title:
        _label(axes, title, picture.shape[1] / 2, picture.shape[0] - 4, ha="center", va="bottom")
    return save_png(figure, path)
