"""Helpers shared by the dataset normalisers: bad-item handling, image sizes, keypoint checks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DataError


@dataclass
class BadItems:
    """Collects malformed items. With ``skip_bad`` false (the default) the first one is raised instead."""

    dataset: str
    skip_bad: bool = False
    items: list[DataError] = field(default_factory=list)

    @contextlib.contextmanager
    def guard(self, path: str | Path) -> Iterator[None]:
        """Run one item's parsing; turn low-level errors into a DataError naming ``path``; record or raise."""
        try:
            yield
        except DataError as exc:
            self._handle(exc)
        except (OSError, ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
            self._handle(DataError(path, f"{type(exc).__name__}: {exc}"))

    def _handle(self, exc: DataError) -> None:
        if not self.skip_bad:
            raise exc
        self.items.append(exc)

    def rows(self) -> list[dict[str, str]]:
        """The recorded problems as rows of the bad-items report."""
        return [{"dataset": self.dataset, "path": e.path, "problem": e.problem} for e in self.items]


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of the image at ``path`` read from its header; DataError if missing or not an image."""
    if not path.is_file():
        raise DataError(path, "image file is missing")
    try:
        with Image.open(path) as im:
            return im.size
    except UnidentifiedImageError as exc:
        raise DataError(path, "not a readable image") from exc


def check_points_inside(points: np.ndarray, width: int, height: int, path: Path, what: str = "keypoint") -> None:
    """Raise DataError naming ``path`` if any of ``points`` [K, 2] lies outside a ``width`` x ``height`` image.

    Points within one pixel of the border count as inside: benchmarks annotate on the outer pixel edge
    and some use 1-based coordinates.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(points).all():
        raise DataError(path, f"{what} coordinates are not finite")
    x, y = points[:, 0], points[:, 1]
    outside = (x < -1) | (x > width) | (y < -1) | (y > height)
    if outside.any():
        first = points[outside][0]
        raise DataError(
            path,
            f"{int(outside.sum())} {what}(s) outside the {width}x{height} image, e.g. ({first[0]:.1f}, {first[1]:.1f})",
        )


def as_points(values: Sequence[Sequence[float]]) -> list[list[float]]:
    """Keypoints as a list of ``[x, y]`` floats (the parquet POINTS type)."""
    return [[float(x), float(y)] for x, y in values]
