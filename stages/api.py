"""The Python API for notebooks: match two images of your own, or load a benchmark pair and its cached features.

:func:`match_images` is the engine of ``pipeline match-pair``: the features stage's canvases and float16
tokens, a catalog matcher setting solved by the match stage's :func:`~stages.match.stage.solve`, and the
keypoint readout, so a pair matched here gets the numbers the match stage would give it. :func:`load_pair`
returns a normalised benchmark pair (images, keypoints, its row of ``pairs.parquet``) with the features the
features stage cached for it; :meth:`BenchmarkPair.match` matches those without loading any model.

Bad arguments raise ValueError (a wrong kind of argument: TypeError), so notebook code catches them the
usual way; the pipeline's own error classes for them (:class:`~pipeline.errors.InputError`,
:class:`~pipeline.errors.CatalogError`) are ValueErrors too. The catalog defaults to the project's
``catalog.yaml`` (``PIPELINE_*`` store roots still apply).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from matplotlib.figure import Figure
from PIL import Image

from pipeline.catalog import REPO_CATALOG, BackboneSpec, Catalog, MatcherSpec, load_catalog
from pipeline.context import StageContext
from pipeline.errors import InputError, StageError
from stages.datasets import normalize as normalize_stage
from stages.features.backbones import Backbone, backbone_key, create_backbone
from stages.features.canvas import CanvasTransform
from stages.features.stage import backbone_settings, open_features, resolve_backbone, shard_features, store_key_params
from stages.match import transfer_keypoints
from stages.match.plan import store_key
from stages.match.settings import MatcherSetting, parse_params
from stages.match.stage import readout_options, solve
from stages.report.draw import correspondence_figure, save_png

ImageLike = str | Path | Image.Image | np.ndarray
MatcherLike = str | MatcherSpec
BackboneLike = str | BackboneSpec | None
CatalogLike = str | Path | Catalog | None


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def as_catalog(catalog: CatalogLike) -> Catalog:
    """A loaded catalog: ``catalog`` itself, the one at a path, or the project's ``catalog.yaml`` for None."""
    if catalog is None or isinstance(catalog, (str, Path)):
        return load_catalog(catalog or REPO_CATALOG)
    if not isinstance(catalog, Catalog):
        raise TypeError(f"catalog: expected a path or a Catalog, got {type(catalog).__name__}")
    return catalog


def read_image(path: str | Path) -> np.ndarray:
    """The image at ``path`` as [H, W, 3] uint8 RGB; InputError naming the file if missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'image file is missing' if not path.exists() else 'not a file'}")
    try:
        with Image.open(path) as file:
            return np.array(file.convert("RGB"))
    except OSError as error:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise InputError(f"{path}: not a readable image ({error})") from None


def as_rgb(image: ImageLike, what: str) -> np.ndarray:
    """``image`` (a file path, a PIL image, or an array [H, W], [H, W, 3] or [H, W, 4] of uint8 0-255 or
    float 0-1 pixels) as [H, W, 3] uint8 RGB. ``what`` names the argument in errors."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what}: expected a file path, a PIL image or an [H, W, 3] array, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or 0 in image.shape:
        raise InputError(f"{what}: expected an [H, W], [H, W, 3] or [H, W, 4] image array, got {list(image.shape)}")
    image = image[:, :, :3]
    if image.dtype == np.uint8:
        return np.array(image)  # a copy: the caller's array may be read-only or change later
    if not np.issubdtype(image.dtype, np.floating):
        raise InputError(f"{what}: expected uint8 (0-255) or float (0-1) pixels, got dtype {image.dtype}")
    if not (np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1):
        raise InputError(f"{what}: float pixels must be finite and in [0, 1], got [{image.min():g}, {image.max():g}]")
    return (image * 255).round().astype(np.uint8)


def point_grid(width: int, height: int, n: int) -> np.ndarray:
    """``n x n`` points [n*n, 2]: the centres of a regular ``n x n`` tiling of a ``width x height`` image."""
    if n < 1:
        raise InputError(f"grid_points must be >= 1, got {n}")
    xs = (np.arange(n) + 0.5) * width / n - 0.5
    ys = (np.arange(n) + 0.5) * height / n - 0.5
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


def check_points(points: Any, width: int, height: int, what: str) -> np.ndarray:
    """``points`` as [K, 2] float64 if each lies on the ``width x height`` source image (pixel centres
    within half a pixel of the border count); InputError naming the first point outside and ``what``."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise InputError(f"points must be a non-empty [K, 2] array of (x, y), got shape {list(points.shape)}")
    x, y = points[:, 0], points[:, 1]
    inside = (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
    if not inside.all():
        bad = points[~inside][0]
        raise InputError(
            f"point ({bad[0]:g}, {bad[1]:g}) lies outside the source image {what} ({width}x{height} px: "
            f"x must be in [-0.5, {width - 0.5:g}], y in [-0.5, {height - 0.5:g}])"
            + (f"; {int((~inside).sum())} points are outside" if (~inside).sum() > 1 else "")
        )
    return points


def matcher_spec(catalog: Catalog, matcher: MatcherLike) -> MatcherSpec:
    """A catalog matcher by name (CatalogError, a ValueError, listing the names), or ``matcher`` itself."""
    if isinstance(matcher, MatcherSpec):
        return matcher
    if not isinstance(matcher, str):
        raise TypeError(f"matcher: expected a catalog matcher name or a MatcherSpec, got {type(matcher).__name__}")
    return catalog.matcher(matcher)


def backbone_spec(catalog: Catalog, backbone: BackboneLike) -> BackboneSpec:
    """A catalog backbone by name (the catalog's default for None), or ``backbone`` itself."""
    if isinstance(backbone, BackboneSpec):
        return backbone
    if backbone is not None and not isinstance(backbone, str):
        raise TypeError(f"backbone: expected a catalog backbone name or a BackboneSpec, got {type(backbone).__name__}")
    return resolve_backbone(catalog, backbone)


@dataclass(frozen=True)
class PairFeatures:
    """The patch tokens of a pair's two images on their canvases: what a matcher reads."""

    tokens: np.ndarray  # [2, Hp, Wp, C] float16, source first
    valid: np.ndarray  # [2, Hp, Wp] bool: patches on the image, not on the canvas's padding
    canvases: tuple[CanvasTransform, CanvasTransform]  # how each image sits on its square canvas
    backbone: str  # the catalog backbone's name
    backbone_key: str  # the feature store's key (model, canvas, weights identity, parameter hash)
    key_params: dict[str, Any]  # everything that changes the tokens (the store's key parameters)
    random_weights: bool  # True: features of an untrained network, meaningless
    src_flipped: np.ndarray | None = None  # [1, Hp, Wp, C] the mirrored source image's tokens (flip-aware GWOT)


@dataclass(frozen=True)
class Match:
    """A matched pair: the images, the source points and where the setting sends them, and its scores.

    ``scores [N, M]`` float32 are GWOT's transport plan or NN's cosine similarities between the source
    and target canvas patches (row-major over each ``Hp x Wp`` grid, padding patches included);
    ``canvases`` say how each image sits on its canvas. Points are (x, y) in original image pixels.
    """

    src_image: np.ndarray  # [Hs, Ws, 3] uint8
    trg_image: np.ndarray  # [Ht, Wt, 3] uint8
    points: np.ndarray  # [K, 2] source points
    predictions: np.ndarray  # [K, 2] their predicted target points
    scores: np.ndarray  # [N, M] plan (gwot) or similarity (nn)
    canvases: tuple[CanvasTransform, CanvasTransform]
    setting: MatcherSetting
    backbone: str
    random_weights: bool
    true_points: np.ndarray | None = None  # [K, 2] annotated target points of a benchmark pair

    @property
    def errors(self) -> np.ndarray | None:
        """[K] distances in target pixels between predictions and ``true_points`` (None without them)."""
        if self.true_points is None:
            return None
        return np.linalg.norm(self.predictions - self.true_points, axis=1)

    @property
    def title(self) -> str:
        """``<setting label> (<method>) on <backbone>``, flagged when the weights are random."""
        random_tag = " - RANDOM WEIGHTS: meaningless" if self.random_weights else ""
        return f"{self.setting.label} ({self.setting.method}) on {self.backbone}{random_tag}"

    def plot(self, path: str | Path | None = None, *, title: str | None = None, height: int | None = None) -> Figure:
        """The correspondence picture (source points joined to their predictions, one hue per point, the
        true target points as circles when known) as a matplotlib Figure; also a PNG at ``path`` if given."""
        figure = correspondence_figure(
            self.src_image,
            self.trg_image,
            self.points,
            self.predictions,
            true_points=self.true_points,
            title=self.title if title is None else title,
            height=height,
        )
        if path is not None:
            save_png(figure, path)
        return figure


@functools.lru_cache(maxsize=2)
def load_backbone(spec: BackboneSpec, device: str) -> Backbone:
    """The backbone of a catalog spec on ``device``, loaded once per session (a notebook calls again and again)."""
    return create_backbone(spec.model, **backbone_settings(spec), device=device)


def image_features(
    src_image: np.ndarray, trg_image: np.ndarray, spec: BackboneSpec, device: str, *, flip: bool = False
) -> PairFeatures:
    """Tokens of two [H, W, 3] uint8 images as the features stage computes and stores them (float16);
    ``flip``: also the mirrored source image's, which flip-aware matchers read."""
    spec = replace(spec, flip=flip)
    model = load_backbone(spec, device)
    transforms = tuple(
        CanvasTransform.fit(image.shape[1], image.shape[0], spec.image_size, model.patch_size)
        for image in (src_image, trg_image)
    )
    features = shard_features([src_image, trg_image], transforms, model, batch_size=spec.batch_size)
    params = store_key_params(spec, device)
    return PairFeatures(
        tokens=features.tokens,
        valid=features.valid,
        canvases=transforms,
        backbone=spec.name,
        backbone_key=backbone_key(params),
        key_params=params,
        random_weights=model.random_weights,
        src_flipped=None if features.tokens_flipped is None else features.tokens_flipped[:1],
    )


def setting_for(spec: MatcherSpec, params: Mapping[str, Any] | None, backbone_key: str) -> MatcherSetting:
    """The setting of catalog matcher ``spec`` with ``params`` overriding its parameters (checked: a bad
    key or value is a CatalogError, a ValueError, naming the parameter)."""
    changed = tuple((params or {}).items())
    checked = parse_params(spec, dict(changed), where="params" if changed else None)
    return MatcherSetting(
        name=spec.name, method=spec.method, params=checked, backbone_key=backbone_key, overrides=changed
    )


def match_features(
    features: PairFeatures,
    setting: MatcherSetting,
    src_image: np.ndarray,
    trg_image: np.ndarray,
    points: np.ndarray,
    *,
    true_points: np.ndarray | None = None,
    device: str | None = None,
) -> Match:
    """Solve ``setting`` on a pair's features and transfer ``points [K, 2]`` (checked source pixels)."""
    device = torch.device(device or default_device())
    tokens = torch.from_numpy(features.tokens.astype(np.float32)).to(device)
    valid = torch.from_numpy(features.valid).to(device)
    src_flipped = None
    if setting.params.needs_flipped:
        if features.src_flipped is None:
            raise InputError(
                f"matcher {setting.label!r} is flip-aware and needs the mirrored source image's features; "
                "they were not computed (a catalog backbone with flip: true stores them)"
            )
        src_flipped = torch.from_numpy(features.src_flipped.astype(np.float32)).to(device)
    scores = solve(setting, tokens[:1], tokens[1:], valid[:1], valid[1:], src_flipped).scores[0]
    predictions = transfer_keypoints(scores, points, *features.canvases, **readout_options(setting))
    return Match(
        src_image=src_image,
        trg_image=trg_image,
        points=points,
        predictions=predictions,
        scores=scores.dense()[0].float().cpu().numpy(),
        canvases=features.canvases,
        setting=setting,
        backbone=features.backbone,
        random_weights=features.random_weights,
        true_points=true_points,
    )


def match_images(
    img0: ImageLike,
    img1: ImageLike,
    *,
    backbone: BackboneLike = None,
    matcher: MatcherLike = "gwot",
    points: Any = None,
    params: Mapping[str, Any] | None = None,
    catalog: CatalogLike = None,
    device: str | None = None,
    grid_points: int = 8,
) -> Match:
    """Match ``img0`` (source) to ``img1`` (target): where each source point lands in the target.

    Images are file paths, PIL images or arrays (see :func:`as_rgb`). ``backbone`` and ``matcher`` are
    catalog names (or specs); ``params`` overrides matcher parameters, e.g. ``{"eps": 0.05}``. ``points
    [K, 2]`` (x, y) are source pixels; None takes a ``grid_points x grid_points`` grid. ``device``:
    ``cuda`` when available, else ``cpu``. The backbone is loaded once per session. Arguments are checked
    before any model is loaded.

    >>> m = match_images("cat1.jpg", "cat2.jpg", backbone="dinov2_vitb14", points=[[120, 64]])
    >>> m.predictions, m.plot()
    """
    catalog = as_catalog(catalog)
    src_image, trg_image = as_rgb(img0, "img0"), as_rgb(img1, "img1")
    spec = backbone_spec(catalog, backbone)
    matcher = matcher_spec(catalog, matcher)
    setting_for(matcher, params, "")  # check the parameters before loading a model
    height, width = src_image.shape[:2]
    what = str(img0) if isinstance(img0, (str, Path)) else "img0"
    points = point_grid(width, height, grid_points) if points is None else check_points(points, width, height, what)
    device = device or default_device()
    needs_flipped = setting_for(matcher, params, "").params.needs_flipped
    features = image_features(src_image, trg_image, spec, device, flip=needs_flipped)
    setting = setting_for(matcher, params, features.backbone_key)
    return match_features(features, setting, src_image, trg_image, points, device=device)


@dataclass(frozen=True)
class BenchmarkPair:
    """A normalised benchmark pair: its images, annotated keypoints, its row of ``pairs.parquet`` and, when
    loaded, its cached features. ``match()`` runs a catalog matcher on those features."""

    dataset: str
    pair_id: str
    category: str
    src_image: np.ndarray  # [Hs, Ws, 3] uint8
    trg_image: np.ndarray  # [Ht, Wt, 3] uint8
    src_kps: np.ndarray  # [K, 2] (x, y) source pixels; K = 0 for a pair scored by flow only
    trg_kps: np.ndarray  # [K, 2] the annotated target points
    info: dict[str, Any]  # the pair's row: threshold kind, bbox, flip, difficulty flags, flow file...
    features: PairFeatures | None
    catalog: Catalog = field(repr=False)

    def match(
        self,
        matcher: MatcherLike = "gwot",
        *,
        params: Mapping[str, Any] | None = None,
        device: str | None = None,
        grid_points: int = 8,
    ) -> Match:
        """Match the cached features with a catalog matcher (``params`` override its parameters) and
        transfer the annotated source keypoints (a ``grid_points`` grid when the pair has none)."""
        if self.features is None:
            raise InputError(f"pair {self.pair_id!r} was loaded without features; call load_pair(..., features=True)")
        setting = setting_for(matcher_spec(self.catalog, matcher), params, self.features.backbone_key)
        has_kps = len(self.src_kps) > 0
        height, width = self.src_image.shape[:2]
        points = self.src_kps if has_kps else point_grid(width, height, grid_points)
        true_points = self.trg_kps if has_kps else None
        return match_features(
            self.features, setting, self.src_image, self.trg_image, points, true_points=true_points, device=device
        )


def _pair_features(catalog: Catalog, dataset: str, backbone: BackboneLike, image_ids: list[str]) -> PairFeatures:
    """The cached features of two images of ``dataset``; FeatureStoreError naming the command that computes them."""
    spec = backbone_spec(catalog, backbone)
    store = open_features(catalog, dataset, spec.name)
    tokens, valid = store.read(image_ids)
    src_flipped = store.read(image_ids[:1], flipped=True)[0] if store.flipped else None
    rows = store.rows_for(image_ids)
    return PairFeatures(
        tokens=tokens,
        valid=valid,
        canvases=tuple(CanvasTransform(**store.transforms[row]) for row in rows),
        backbone=spec.name,
        backbone_key=store_key(store),
        key_params=store.key_params,
        random_weights=store.random_weights,
        src_flipped=src_flipped,
    )


def load_pair(
    dataset: str,
    pair_id: str,
    *,
    backbone: BackboneLike = None,
    catalog: CatalogLike = None,
    features: bool = True,
) -> BenchmarkPair:
    """Pair ``pair_id`` of a normalised catalog dataset, with its features under ``backbone`` (the
    catalog's default for None) from the features stage's store; ``features=False`` skips them.

    Raises CatalogError (a ValueError) for an unknown dataset or backbone, InputError (a ValueError) for an
    unknown pair id, StageError when the dataset is not normalised and FeatureStoreError when its features
    are not computed (both naming the command to run).
    """
    catalog = as_catalog(catalog)
    catalog.dataset(dataset)
    if not normalize_stage.status(StageContext(catalog=catalog, datasets=(dataset,)), dataset).complete:
        raise StageError(
            f"dataset {dataset!r} is not normalised yet; run `pipeline run --stage normalize --dataset {dataset}`"
        )
    images, pairs = normalize_stage.read_tables(catalog.normalized_dir(dataset))
    rows = pairs.filter(pc.equal(pairs["pair_id"], pair_id)).to_pylist()
    if not rows:
        some = ", ".join(repr(p) for p in pairs["pair_id"].to_pylist()[:3])
        raise InputError(f"dataset {dataset!r} has no pair {pair_id!r} ({pairs.num_rows} pairs, e.g. {some})")
    row = rows[0]
    image_ids = [row["src_image_id"], row["trg_image_id"]]
    paths = dict(zip(images["image_id"].to_pylist(), images["path"].to_pylist(), strict=True))
    src_image, trg_image = (read_image(catalog.raw_dir(dataset) / paths[image_id]) for image_id in image_ids)
    return BenchmarkPair(
        dataset=dataset,
        pair_id=pair_id,
        category=row["category"],
        src_image=src_image,
        trg_image=trg_image,
        src_kps=np.asarray(row["src_kps"], dtype=np.float64).reshape(-1, 2),
        trg_kps=np.asarray(row["trg_kps"], dtype=np.float64).reshape(-1, 2),
        info={key: value for key, value in row.items() if key not in ("src_kps", "trg_kps")},
        features=_pair_features(catalog, dataset, backbone, image_ids) if features else None,
        catalog=catalog,
    )
