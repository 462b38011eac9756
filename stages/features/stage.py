"""The features stage: each image's patch tokens under one backbone, computed on Dask workers, cached in Zarr.

For each dataset the driver names the store ``<cache_root>/features/<dataset>/<key>.zarr`` after the
backbone's key parameters (model, weights identity, canvas size, layer, the compute dtype of the workers'
device, the storage dtype), creates it or appends the images it lacks, and submits one task per shard
still to compute. A task loads the model once per worker process, reads its images, runs batched
inference and writes its own shard, so writers never collide and a killed run resumes at the shards that
were not committed.

Every run first verifies the store: it reads each committed chunk against its crc32c checksum and marks a
shard that fails (or lost a chunk) for recomputation. Reading is cheap next to computing, but it grows
with the store (a full read of every chunk). ``--force`` rewrites every shard in place instead.
A backbone with random weights is announced by a warning on every run and by ``RANDOM`` in the store's name.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import stable_hash
from pipeline.catalog import BackboneSpec, Catalog
from pipeline.context import StageContext, StageStatus
from pipeline.errors import CatalogError, StageError
from pipeline.features_store import DEFAULT_SHARD_SIZE, FeatureStore, FeatureStoreError
from stages.datasets import normalize as normalize_stage
from stages.features.backbone_keys import BackboneError, backbone_key, backbone_key_params, patch_size
from stages.features.canvas import CanvasTransform, image_to_canvas

if TYPE_CHECKING:  # torch, timm and distributed are imported where they run: `pipeline status` needs none
    from distributed import Client

    from stages.features.backbones import Backbone

log = logging.getLogger(__name__)

# Part of every feature store's key: bump it with any change to the canvases or a backbone's code that
# alters the tokens, so features of the older code are never taken as computed.
FEATURES_VERSION = 1
GPU, CPU = "cuda", "cpu"
DEVICES = (GPU, CPU)  # the devices a store's key can name, in the order open_features prefers them


def resolve_backbone(catalog: Catalog, name: str | None) -> BackboneSpec:
    """The backbone called ``name``, or the catalog's ``default_backbone`` when ``name`` is None."""
    name = name or catalog.default_backbone
    if name is None:
        raise CatalogError(
            f"{catalog.path}: no backbone chosen; pass --backbone NAME or set default_backbone "
            f"(the catalog defines: {', '.join(sorted(catalog.backbones)) or 'none'})"
        )
    return catalog.backbone(name)


def backbone_settings(spec: BackboneSpec) -> dict[str, Any]:
    """A catalog backbone's settings as the keyword arguments of ``create_backbone`` and ``backbone_key_params``."""
    return {
        "weights": spec.weights,
        "image_size": spec.image_size,
        "layer": spec.layer,
        "flip": spec.flip,
        "pos_embed": spec.pos_embed,
    }


def store_key_params(spec: BackboneSpec, device: str) -> dict[str, Any]:
    """The feature store's key parameters (``FeatureStore.key_params``, which name the store): the backbone's
    key parameters on ``device``, the storage dtype and ``FEATURES_VERSION``."""
    return _with_storage(backbone_key_params(spec.model, **backbone_settings(spec), device=device), spec)


def _with_storage(key_params: dict[str, Any], spec: BackboneSpec) -> dict[str, Any]:
    """A backbone's key parameters with what storing its tokens adds: the dtype, the implementation version."""
    return {**key_params, "dtype": spec.dtype, "implementation": FEATURES_VERSION}


def features_path(catalog: Catalog, dataset: str, params: dict[str, Any]) -> str:
    """``<cache_root>/features/<dataset>/<model>-<size>[-RANDOM]-<hash>.zarr``."""
    return f"{catalog.stores.cache_root.rstrip('/')}/features/{dataset}/{backbone_key(params)}.zarr"


def _done_images(store: FeatureStore) -> int:
    return store.n_images - sum(len(rows) for _, rows in store.missing_shards())


def open_features(
    catalog: Catalog, dataset: str, backbone_name: str | None = None, *, device: str | None = None
) -> FeatureStore:
    """The feature store of ``dataset`` under ``backbone_name`` (default: the catalog's); loads no model.

    The store's key depends on the device that computed it (CUDA computes in bfloat16). With ``device``
    None, the store that exists is opened; when stores of both devices exist, the more complete one, CUDA's
    on a tie. Raises FeatureStoreError when there is none.
    """
    spec = resolve_backbone(catalog, backbone_name)
    devices = (device,) if device else DEVICES
    paths = list(dict.fromkeys(features_path(catalog, dataset, store_key_params(spec, d)) for d in devices))
    stores = []
    for path in paths:
        with contextlib.suppress(FeatureStoreError):
            stores.append(FeatureStore.open(path))
    if not stores:
        raise FeatureStoreError(
            f"no features of dataset {dataset!r} under backbone {spec.name!r} (none of {', '.join(paths)}); "
            f"run `pipeline run --stage features --dataset {dataset} --backbone {spec.name}`"
        )
    return max(stores, key=_done_images)  # max keeps the first of equals: CUDA's


@dataclass(frozen=True)
class ShardFeatures:
    """Features of a run of images: tokens [n, Hp, Wp, C] float16, valid [n, Hp, Wp] bool, mirrored tokens."""

    tokens: np.ndarray
    valid: np.ndarray
    tokens_flipped: np.ndarray | None


def shard_features(
    images: Sequence[np.ndarray],
    transforms: Sequence[CanvasTransform],
    backbone: Backbone,
    *,
    batch_size: int,
) -> ShardFeatures:
    """Patch tokens of images [H, W, 3] uint8 on their canvases, ``batch_size`` canvases per forward pass.

    Also the tokens of the mirrored canvases when ``backbone.flip``; valid marks the patches on the image.
    """
    import torch

    tokens, flipped = [], []
    for start in range(0, len(images), batch_size):
        batch = zip(images[start : start + batch_size], transforms[start : start + batch_size], strict=True)
        canvases = torch.stack([image_to_canvas(image, transform) for image, transform in batch])
        # float16 in torch: overflow becomes inf (named by write_shard) instead of a NumPy warning
        tokens.append(backbone(canvases).to("cpu", torch.float16).numpy())
        if backbone.flip:
            flipped.append(backbone.flipped(canvases).to("cpu", torch.float16).numpy())
    return ShardFeatures(
        tokens=np.concatenate(tokens),
        valid=np.stack([transform.valid_patches() for transform in transforms]),
        tokens_flipped=np.concatenate(flipped) if backbone.flip else None,
    )


@dataclass(frozen=True)
class ShardTask:
    """One Dask task: the rows of one shard still to compute and everything a worker needs for them."""

    store_path: str
    shard: int
    image_ids: tuple[str, ...]
    paths: tuple[str, ...]  # absolute image paths
    transforms: tuple[CanvasTransform, ...]
    backbone: BackboneSpec
    device: str


_BACKBONES: dict[str, Backbone] = {}
_BACKBONES_LOCK = threading.Lock()


def _worker_backbone(spec: BackboneSpec, device: str) -> Backbone:
    """The backbone of ``spec`` on ``device``, loaded once per worker process and keyed by its key params."""
    from stages.features.backbones import create_backbone

    settings = backbone_settings(spec)
    key = stable_hash(backbone_key_params(spec.model, **settings, device=device))
    with _BACKBONES_LOCK:
        if key not in _BACKBONES:
            _BACKBONES.clear()  # one model per process at a time: a ViT-g alone takes ~4.5 GB
            _BACKBONES[key] = create_backbone(spec.model, **settings, device=device)
        return _BACKBONES[key]


def _read_images(task: ShardTask) -> list[np.ndarray]:
    """The task's images as [H, W, 3] uint8 RGB; one StageError naming every unreadable image."""
    import PIL.Image

    images, problems = [], []
    for image_id, path, transform in zip(task.image_ids, task.paths, task.transforms, strict=True):
        try:
            with PIL.Image.open(path) as file:
                image = np.array(file.convert("RGB"))  # a writable copy, as torch.from_numpy wants
        except OSError as error:  # PIL's UnidentifiedImageError is an OSError too
            problems.append(f"{image_id!r} ({path}: {error})")
            continue
        if image.shape[:2] != (transform.height, transform.width):
            problems.append(
                f"{image_id!r} ({path}: {image.shape[1]}x{image.shape[0]} px, the images table says "
                f"{transform.width}x{transform.height}; normalise the dataset again)"
            )
        images.append(image)
    if problems:
        raise StageError(f"cannot use image(s) {'; '.join(problems)}")
    return images


@contextlib.contextmanager
def _torch_threads(n_threads: int) -> Iterator[None]:
    """Run torch on ``n_threads`` threads, then restore: a thread-pool worker shares the driver's process."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compute_shard(task: ShardTask) -> int:
    """Worker side: compute the task's rows, write them into shard ``task.shard``; return the image count."""
    from distributed import get_worker

    images = _read_images(task)
    store = FeatureStore.open(task.store_path)
    with _torch_threads(get_worker().state.nthreads):
        backbone = _worker_backbone(task.backbone, task.device)
        params = _with_storage(backbone.key_params(), task.backbone)
        if params != store.key_params:
            raise StageError(
                f"{task.store_path}: this worker's backbone has key parameters {params}, the store was made "
                f"for {store.key_params}; give every worker the same weights file and kind of device"
            )
        features = shard_features(images, task.transforms, backbone, batch_size=task.backbone.batch_size)
    store.write_shard(task.shard, features.tokens, features.valid, tokens_flipped=features.tokens_flipped)
    return len(images)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def worker_device(client: Client) -> str:
    """``cuda`` when every worker sees a GPU, ``cpu`` when none does; a mixed cluster is refused."""
    answers = client.run(_cuda_available)
    if not answers:
        raise StageError("the Dask cluster has no workers; start some with `dask worker <scheduler address>`")
    if len(set(answers.values())) > 1:
        with_gpu = sorted(address for address, gpu in answers.items() if gpu)
        raise StageError(
            f"{len(with_gpu)} of {len(answers)} Dask workers have a GPU ({', '.join(with_gpu)}); GPUs "
            "compute in bfloat16 and CPUs in float32, so one store cannot take both: use one kind of worker"
        )
    return GPU if next(iter(answers.values())) else CPU


def _backbone_dim(spec: BackboneSpec, device: str) -> int:
    return _worker_backbone(spec, device).dim


def _listing(image_ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(map(repr, image_ids[:limit]))
    return shown + (f" and {len(image_ids) - limit} more" if len(image_ids) > limit else "")


def extract_features(
    client: Client,
    catalog: Catalog,
    dataset: str,
    images: pa.Table,
    spec: BackboneSpec,
    *,
    device: str,
    force: bool = False,
    verify: bool = False,
    progress: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> FeatureStore:
    """Compute the features the store lacks of ``images`` (the normalised images table); return the store.

    With ``verify`` every committed chunk is read back first and the shards that fail their checksum are
    recomputed (a full read of the store: for 10,000 images at ViT-B/840 about 53 GB, so it is opt-in;
    without it a corrupted chunk is still caught when a later stage reads it, and the error says to
    run with ``--verify``). ``force`` recomputes every shard.
    ``shard_size`` applies to a new store only. Raises StageError naming the images of the shards that
    failed twice, after every other shard is stored.
    """
    from pipeline.cluster import run_tasks  # imports dask and distributed

    params = store_key_params(spec, device)
    path = features_path(catalog, dataset, params)
    random_weights = _warn_if_random(dataset, params)
    rows = images.select(["image_id", "path", "width", "height"]).to_pylist()
    patch = patch_size(spec.model)
    transforms = [CanvasTransform.fit(r["width"], r["height"], spec.image_size, patch) for r in rows]
    try:
        dim = FeatureStore.open(path).dim
    except FeatureStoreError:  # absent, or its creation was interrupted: create_or_open starts it afresh
        dim = client.submit(_backbone_dim, spec, device, pure=False).result()
    grid = spec.image_size // patch
    store = FeatureStore.create_or_open(
        path,
        image_ids=[r["image_id"] for r in rows],
        transforms=[transform.as_dict() for transform in transforms],
        grid=(grid, grid),
        dim=dim,
        key_params=params,
        random_weights=random_weights,
        flipped=spec.flip,
        shard_size=shard_size,
    )
    if force:
        work = store.shards()
    else:
        corrupt = store.verify() if verify else []
        if corrupt:
            log.warning("features %s: shard(s) %s failed their checksum and are recomputed", dataset, corrupt)
        work = store.missing_shards()
    if not work:
        log.info("features %s: all %d images already computed in %s", dataset, store.n_images, path)
        return store
    raw = catalog.raw_dir(dataset)
    tasks = [
        ShardTask(
            store_path=path,
            shard=shard,
            image_ids=tuple(store.image_ids[row] for row in shard_rows),
            paths=tuple(str(raw / rows[row]["path"]) for row in shard_rows),
            transforms=tuple(transforms[row] for row in shard_rows),
            backbone=spec,
            device=device,
        )
        for shard, shard_rows in work
    ]
    n_images = sum(len(task.image_ids) for task in tasks)
    log.info("features %s: %d images in %d shard(s) to compute into %s", dataset, n_images, len(tasks), path)
    failures = run_tasks(
        client, compute_shard, tasks, total=n_images, desc=f"features {dataset}", unit="img", progress=progress
    )
    if failures:
        lines = [f"shard {task.shard} (images {_listing(task.image_ids)}): {error}" for task, error in failures]
        raise StageError(
            f"features of dataset {dataset!r}: {len(failures)} of {len(tasks)} shard(s) failed twice; the "
            "others are stored and the next run computes only these:\n  " + "\n  ".join(lines)
        )
    return store


def _normalized_images(ctx: StageContext, dataset: str) -> pa.Table:
    if not normalize_stage.status(ctx, dataset).complete:
        raise StageError(
            f"dataset {dataset!r} is not normalised yet; run `pipeline run --stage normalize --dataset {dataset}`"
        )
    images, _ = normalize_stage.read_tables(ctx.catalog.normalized_dir(dataset))
    return images


def _warn_if_random(dataset: str, params: dict[str, Any]) -> bool:
    """Log, on every run, that features from random weights mean nothing; returns whether they are random."""
    random_weights = params["weights"].startswith("random")
    if random_weights:
        log.warning("features of %s use RANDOM weights: numbers are meaningless except for testing", dataset)
    return random_weights


def _store_exists(path: str) -> bool:
    try:
        FeatureStore.open(path)
    except FeatureStoreError:
        return False
    return True


def _complete_without_a_cluster(ctx: StageContext, spec: BackboneSpec, tables: dict[str, pa.Table]) -> bool:
    """Whether a local run would find every store complete, so that no Dask cluster needs starting.

    Only for local clusters, whose device this process knows (a GPU when torch sees one, as in
    ``pipeline.cluster``); an external scheduler's workers are asked, so they always get a client.
    """
    options = ctx.options
    if options.force or options.verify or options.scheduler or ctx.catalog.cluster.address:
        return False
    for dataset in tables:  # nothing stored yet: no need to import torch to learn this machine's device
        paths = {features_path(ctx.catalog, dataset, store_key_params(spec, device)) for device in DEVICES}
        if not any(_store_exists(path) for path in paths):
            return False
    params = store_key_params(spec, GPU if _cuda_available() else CPU)
    for dataset, images in tables.items():
        try:
            store = FeatureStore.open(features_path(ctx.catalog, dataset, params))
        except FeatureStoreError:
            return False
        if set(images.column("image_id").to_pylist()) - set(store.image_ids) or store.missing_shards():
            return False
    for dataset in tables:
        _warn_if_random(dataset, params)
        log.info("features %s: all images already computed in the %s store", dataset, spec.name)
    return True


def check_backbone(spec: BackboneSpec) -> None:
    """Raise CatalogError naming the catalog backbone when its settings are invalid or its weights cannot be
    loaded (``check_weights``: seconds, no retries), so that no cluster starts for work that must fail."""
    from stages.features.weights import check_weights  # torch and timm only for a weights file

    try:
        backbone_key_params(spec.model, **backbone_settings(spec))
        check_weights(spec.model, spec.weights)
    except BackboneError as error:
        raise CatalogError(f"backbones.{spec.name}: {error}") from error


def run(ctx: StageContext) -> None:
    """Compute the missing features of every selected dataset under the chosen (or default) backbone."""
    spec = resolve_backbone(ctx.catalog, ctx.options.backbone)
    tables = {dataset: _normalized_images(ctx, dataset) for dataset in ctx.datasets}
    if _complete_without_a_cluster(ctx, spec, tables):
        return
    check_backbone(spec)  # on the driver, before a cluster starts
    from pipeline.cluster import dask_client  # imports dask and distributed

    with dask_client(ctx.catalog.cluster, ctx.options.scheduler) as client:
        device = worker_device(client)
        for dataset, images in tables.items():
            extract_features(
                client,
                ctx.catalog,
                dataset,
                images,
                spec,
                device=device,
                force=ctx.options.force,
                verify=ctx.options.verify,
                progress=ctx.options.progress,
            )


def status(ctx: StageContext, dataset: str) -> StageStatus:
    """Shards done of those the dataset's images need, in the chosen (or default) backbone's store."""
    if not normalize_stage.status(ctx, dataset).complete:
        return StageStatus(0, None, "normalize first")
    name = ctx.options.backbone or ctx.catalog.default_backbone
    if name is None:
        return StageStatus(0, None, "no backbone: pass --backbone or set default_backbone")
    n_images = pq.read_metadata(ctx.catalog.normalized_dir(dataset) / normalize_stage.TABLES.images).num_rows
    try:
        store = open_features(ctx.catalog, dataset, name)
    except FeatureStoreError:
        return StageStatus(0, math.ceil(n_images / DEFAULT_SHARD_SIZE), f"{name}: no features yet")
    missing = dict(store.missing_shards())
    # Rows are appended in the table's order, so shard i of the table is shard i of the store once complete.
    needed = [min(store.shard_size, n_images - start) for start in range(0, n_images, store.shard_size)]
    done_rows = {index: len(rows) - len(missing.get(index, ())) for index, rows in store.shards()}
    done = sum(done_rows.get(index, 0) >= count for index, count in enumerate(needed))
    weights = ", RANDOM weights" if store.random_weights else ""
    return StageStatus(done, len(needed), f"{name}: {store.path.rsplit('/', 1)[-1]}{weights}")
