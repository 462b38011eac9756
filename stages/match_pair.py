"""Match your own image pair and write the results: one picture per matcher and a JSON of the points.

:func:`match_pair` is what ``pipeline match-pair SRC TRG`` runs, a thin layer over the notebook API
(:mod:`stages.api`): the features are computed once and each matcher solved on them by
:func:`stages.api.match_features`, so a pair matched here gives the numbers the match stage would give it.
Nothing is cached on disk.

Outputs in ``out_dir``: ``<src stem>-<trg stem>-<matcher>.png`` per matcher (source points joined to their
predictions, one hue per point) and ``<src stem>-<trg stem>.json`` with the images, the backbone, and per
matcher its parameters, the source points and the predictions, all in original image pixels (x, y).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.cache import atomic_write_bytes
from pipeline.catalog import BackboneSpec, MatcherSpec
from pipeline.errors import InputError
from stages.api import check_points, default_device, image_features, match_features, point_grid, read_image, setting_for

DEFAULT_MATCHERS = ("nn", "gwot")  # what `pipeline match-pair` runs without --matcher


@dataclass(frozen=True)
class MatchPairResult:
    """What :func:`match_pair` wrote and found: the JSON record, one picture per matcher name, the source
    points ``[K, 2]`` and each matcher's predicted target points ``[K, 2]`` (original pixels, x, y)."""

    json_path: Path
    pictures: dict[str, Path]
    points: np.ndarray
    predictions: dict[str, np.ndarray]


def parse_points(texts: Sequence[str]) -> np.ndarray | None:
    """``["10,20 30,40", "50,60"]`` -> ``[[10, 20], [30, 40], [50, 60]]`` float64; None when no text is given.

    Each text holds one or more ``x,y`` pairs separated by spaces (so ``--points "10,20 30,40"`` and
    repeated ``--points 10,20`` both work). Raises InputError quoting a malformed pair.
    """
    if not texts:
        return None
    points = []
    for pair in (pair for text in texts for pair in text.split()):
        try:
            x, y = (float(value) for value in pair.split(","))
        except ValueError:
            x = y = float("nan")
        if not (np.isfinite(x) and np.isfinite(y)):
            raise InputError(f"--points: {pair!r} is not a point; expected X,Y in source pixels, e.g. 120,64.5")
        points.append([x, y])
    if not points:
        raise InputError("--points: no point given; expected X,Y pairs in source pixels, e.g. 120,64.5 30,40")
    return np.asarray(points, dtype=np.float64)


def match_pair(
    src_path: str | Path,
    trg_path: str | Path,
    *,
    backbone: BackboneSpec,
    matchers: Sequence[MatcherSpec],
    points: np.ndarray | None,
    out_dir: str | Path,
    device: str | None = None,
    grid_points: int = 8,
) -> MatchPairResult:
    """Match the images at ``src_path`` and ``trg_path`` with every matcher; write pictures and a JSON record.

    ``points [K, 2]`` (x, y) are source pixels to transfer; None takes a ``grid_points x grid_points``
    grid over the source image. ``device`` defaults to ``cuda`` when available, else ``cpu``. Raises
    InputError for an unreadable image or a point outside the source image and CatalogError for invalid
    matcher parameters (both ValueErrors, before any model is loaded).
    """
    src_path, trg_path, out_dir = Path(src_path), Path(trg_path), Path(out_dir)
    if not matchers:
        raise InputError("no matcher given; pass at least one catalog matcher (e.g. nn, gwot)")
    # check every matcher's parameters before loading a model
    needs_flipped = any(setting_for(matcher, None, "").params.needs_flipped for matcher in matchers)
    src_image, trg_image = read_image(src_path), read_image(trg_path)
    src_height, src_width = src_image.shape[:2]
    if points is None:
        points = point_grid(src_width, src_height, grid_points)
    points = check_points(points, src_width, src_height, str(src_path))

    device = device or default_device()
    features = image_features(src_image, trg_image, backbone, device, flip=needs_flipped)
    stem = f"{src_path.stem}-{trg_path.stem}"
    pictures, predictions, records = {}, {}, {}
    for matcher in matchers:
        setting = setting_for(matcher, None, features.backbone_key)
        match = match_features(features, setting, src_image, trg_image, points, device=device)
        predictions[matcher.name] = match.predictions
        pictures[matcher.name] = out_dir / f"{stem}-{matcher.name}.png"
        match.plot(pictures[matcher.name])
        records[matcher.name] = {
            "method": matcher.method,
            "key": setting.key,
            "params": asdict(setting.params),
            "points": points.tolist(),
            "predictions": match.predictions.tolist(),
        }

    record = {
        "src": {"path": str(src_path.resolve()), "width": src_width, "height": src_height},
        "trg": {"path": str(trg_path.resolve()), "width": trg_image.shape[1], "height": trg_image.shape[0]},
        "backbone": {
            "name": backbone.name,
            "key": features.backbone_key,
            "params": features.key_params,
            "random_weights": features.random_weights,
            "device": device,
        },
        "matchers": records,
    }
    json_path = out_dir / f"{stem}.json"
    atomic_write_bytes(json_path, (json.dumps(record, indent=2) + "\n").encode())
    return MatchPairResult(json_path=json_path, pictures=pictures, points=points, predictions=predictions)
