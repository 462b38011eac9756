"""Tests of the features stage: the stored features, resuming, corruption, the Dask workers and the CLI."""

from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline import cluster
from pipeline.catalog import Catalog, load_catalog
from pipeline.cli import cli
from pipeline.cluster import dask_client
from pipeline.context import RunOptions, StageContext, StageStatus
from pipeline.errors import CatalogError, StageError
from pipeline.features_store import CorruptFeaturesError, FeatureStore, FeatureStoreError
from stages.datasets import normalize as normalize_stage
from stages.download import stage as download_stage
from stages.features import backbones, stage
from stages.features.backbones import Backbone, backbone_key, create_backbone
from stages.features.canvas import CanvasTransform, image_to_canvas

SMALL = "vit_small_patch14_dinov2.lvd142m"
BACKBONES = {
    "daisy": {"model": "daisy", "weights": "none", "image_size": 112},
    "vits": {"model": SMALL, "weights": "random", "image_size": 56, "batch_size": 3},
}
IN_PROCESS = {"n_workers": 1, "processes": False}
DEMO = {"kind": "demo", "options": {"n_pairs": 3, "max_side": 128, "n_keypoints": 8}}


def write_catalog(
    folder: Path,
    *,
    data_root: Path | str = "data",
    backbones: dict = BACKBONES,
    cluster: dict = IN_PROCESS,
    datasets: dict | None = None,
    default_backbone: str | None = "daisy",
) -> Path:
    """A catalog in ``folder`` whose cache (and, by default, data) live under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    body = {
        "stores": {"data_root": str(data_root), "cache_root": "cache"},
        "datasets": datasets or {"demo": DEMO},
        "backbones": backbones,
        "cluster": cluster,
        "default_backbone": default_backbone,
    }
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def context(catalog: Path | Catalog, **options: object) -> StageContext:
    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog, environ={})
    return StageContext(catalog, ("demo",), RunOptions(progress=False, **options))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """A data root with the demo dataset (3 pairs, 6 images of at most 128 px) downloaded and normalised."""
    folder = tmp_path_factory.mktemp("demo")
    ctx = context(write_catalog(folder))
    download_stage.run(ctx)
    normalize_stage.run(ctx)
    return folder / "data"


@pytest.fixture
def catalog(tmp_path, demo_data) -> Catalog:
    return load_catalog(write_catalog(tmp_path, data_root=demo_data), environ={})


@pytest.fixture
def forward_calls(monkeypatch) -> list[int]:
    """Batch sizes of every backbone forward pass (the in-process worker shares this process)."""
    calls: list[int] = []
    original = Backbone.__call__

    def counted(self, canvases):
        calls.append(len(canvases))
        return original(self, canvases)

    monkeypatch.setattr(Backbone, "__call__", counted)
    return calls


def images_table(catalog: Catalog) -> pa.Table:
    return normalize_stage.read_tables(catalog.normalized_dir("demo"))[0]


def extract(catalog: Catalog, backbone: str, images: pa.Table | None = None, **options: object) -> FeatureStore:
    with dask_client(catalog.cluster) as client:
        return stage.extract_features(
            client,
            catalog,
            "demo",
            images_table(catalog) if images is None else images,
            catalog.backbone(backbone),
            device=stage.worker_device(client),
            **options,
        )


def read_all(store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    return store.read(list(range(store.n_images)))


def shard_files(store: FeatureStore) -> dict[str, int]:
    """Modification times of every data file of the store."""
    return {str(p): p.stat().st_mtime_ns for p in Path(store.path).rglob("c/**/*") if p.is_file()}


def test_store_holds_the_tokens_masks_and_transforms_of_every_image(catalog):
    ctx = context(catalog)
    stage.run(ctx)
    store = stage.open_features(catalog, "demo")
    images = images_table(catalog).to_pylist()
    params = stage.store_key_params(catalog.backbone("daisy"), "cpu")
    assert store.path == f"{catalog.stores.cache_root}/features/demo/{backbone_key(params)}.zarr"
    assert Path(store.path).name.startswith("daisy-112-") and not store.random_weights
    assert store.key_params == params and params["dtype"] == "float16"
    assert store.image_ids == [row["image_id"] for row in images]
    daisy = create_backbone("daisy", weights="none", image_size=112, layer="prenorm", flip=False)
    tokens, valid = read_all(store)
    assert tokens.dtype == np.float16 and tokens.shape == (6, 8, 8, 104)
    assert valid.dtype == bool and valid.shape == (6, 8, 8)
    for row, image in enumerate(images):
        transform = CanvasTransform.fit(image["width"], image["height"], 112, 14)
        assert store.transforms[row] == transform.as_dict()
        np.testing.assert_array_equal(valid[row], transform.valid_patches())
        pixels = np.array(Image.open(catalog.raw_dir("demo") / image["path"]).convert("RGB"))
        expected = daisy(image_to_canvas(pixels, transform)[None])[0].numpy().astype(np.float16)
        np.testing.assert_array_equal(tokens[row], expected)
    assert not valid.all() and valid.any(axis=(1, 2)).all()  # the demo's images are not square
    assert stage.status(ctx, "demo") == StageStatus(1, 1, f"daisy: {Path(store.path).name}")


def test_a_flip_backbone_also_stores_the_features_of_the_mirrored_images(tmp_path, demo_data):
    backbones = {"daisy": {**BACKBONES["daisy"], "flip": True}}
    catalog = load_catalog(write_catalog(tmp_path, data_root=demo_data, backbones=backbones), environ={})
    stage.run(context(catalog))
    store = stage.open_features(catalog, "demo")
    assert store.flipped and store.key_params["flip"]
    daisy = create_backbone("daisy", weights="none", image_size=112, layer="prenorm", flip=True)
    image = images_table(catalog).to_pylist()[1]
    pixels = np.array(Image.open(catalog.raw_dir("demo") / image["path"]).convert("RGB"))
    canvas = image_to_canvas(pixels, CanvasTransform(**store.transforms[1]))[None]
    tokens, _ = store.read(1, flipped=True)
    np.testing.assert_array_equal(tokens, daisy.flipped(canvas)[0].numpy().astype(np.float16))
    assert not np.array_equal(tokens, store.read(1)[0])


def test_random_weights_are_named_in_the_path_and_warned_about_on_every_run(catalog, caplog):
    ctx = context(catalog, backbone="vits")
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="stages.features.stage"):
            stage.run(ctx)
        assert "features of demo use RANDOM weights: numbers are meaningless except for testing" in caplog.text
    store = stage.open_features(catalog, "demo", "vits")
    assert Path(store.path).name.startswith(f"{SMALL}-56-RANDOM-")
    assert store.random_weights and store.key_params["weights"] == "random:0"
    assert read_all(store)[0].shape == (6, 4, 4, 384)


def test_a_second_run_computes_nothing_and_force_recomputes_everything(catalog, forward_calls, monkeypatch):
    stage.run(context(catalog, backbone="vits"))
    assert forward_calls == [3, 3]  # one shard of 6 images, batches of 3
    store = stage.open_features(catalog, "demo", "vits")
    before, mtimes = read_all(store), shard_files(store)
    with monkeypatch.context() as patch:  # nothing to do: not even a Dask cluster is started
        patch.setattr(cluster, "dask_client", lambda *_: pytest.fail("a cluster was started for no work"))
        stage.run(context(catalog, backbone="vits"))
    assert forward_calls == [3, 3] and shard_files(store) == mtimes
    stage.run(context(catalog, backbone="vits", force=True))
    assert forward_calls == [3, 3, 3, 3]
    assert all(shard_files(store)[name] > mtime for name, mtime in mtimes.items())
    for old, new in zip(before, read_all(store), strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.mark.slow
def test_one_or_two_worker_processes_and_batch_sizes_give_the_same_store(tmp_path, demo_data):
    one = load_catalog(write_catalog(tmp_path / "one", data_root=demo_data), environ={})
    two = load_catalog(
        write_catalog(
            tmp_path / "two",
            data_root=demo_data,
            backbones={**BACKBONES, "vits": {**BACKBONES["vits"], "batch_size": 1}},
            cluster={"n_workers": 2, "processes": True},
        ),
        environ={},
    )
    reference = extract(one, "vits", shard_size=2)
    with dask_client(two.cluster) as client:
        device = stage.worker_device(client)
        store = stage.extract_features(
            client, two, "demo", images_table(two), two.backbone("vits"), device=device, shard_size=2
        )
        models_loaded = client.run(lambda: len(stage._BACKBONES))
    assert list(models_loaded.values()) == [1, 1]  # both worker processes computed shards
    assert Path(store.path).name == Path(reference.path).name and store.shards() == reference.shards()
    tokens, valid = read_all(store)
    reference_tokens, reference_valid = read_all(reference)
    np.testing.assert_array_equal(valid, reference_valid)
    np.testing.assert_allclose(tokens.astype(np.float32), reference_tokens.astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.fixture
def clean_store(tmp_path, demo_data) -> FeatureStore:
    """The vits store of a run without incidents, shards of 2 images, for comparison."""
    return extract(
        load_catalog(write_catalog(tmp_path / "clean", data_root=demo_data), environ={}), "vits", shard_size=2
    )


def assert_same_store(store: FeatureStore, reference: FeatureStore) -> None:
    assert store.image_ids == reference.image_ids and store.transforms == reference.transforms
    assert store.missing_shards() == []
    for values, expected in zip(read_all(store), read_all(reference), strict=True):
        np.testing.assert_array_equal(values, expected)


def test_a_failed_shard_is_reported_after_the_others_and_a_rerun_computes_only_it(
    tmp_path, demo_data, clean_store, forward_calls
):
    shutil.copytree(demo_data, tmp_path / "data")  # this test damages an image
    catalog = load_catalog(write_catalog(tmp_path), environ={})
    row = images_table(catalog).to_pylist()[2]
    path = catalog.raw_dir("demo") / row["path"]
    original = path.read_bytes()
    path.write_bytes(b"not a png")
    forward_calls.clear()
    with pytest.raises(StageError, match=r"(?s)1 of 3 shard\(s\) failed twice.*shard 1 \(images '001-") as error:
        extract(catalog, "vits", shard_size=2)
    assert f"cannot use image(s) {row['image_id']!r} ({path}: " in str(error.value)
    store = FeatureStore.open(
        stage.features_path(catalog, "demo", stage.store_key_params(catalog.backbone("vits"), "cpu"))
    )
    assert store.missing_shards() == [(1, range(2, 4))]
    assert forward_calls == [2, 2]  # shards 0 and 2; shard 1 fails on reading, before any forward pass
    path.write_bytes(original)
    forward_calls.clear()
    assert_same_store(extract(catalog, "vits", shard_size=2), clean_store)
    assert forward_calls == [2]


def test_images_added_to_the_dataset_are_appended_and_only_they_are_computed(catalog, clean_store, forward_calls):
    images = images_table(catalog)
    first = extract(catalog, "vits", images.slice(0, 3), shard_size=2)
    assert first.n_images == 3 and forward_calls == [2, 1]
    forward_calls.clear()
    assert_same_store(extract(catalog, "vits", images, shard_size=2), clean_store)
    assert forward_calls == [1, 2]  # row 3 completes shard 1, rows 4-5 are shard 2


def test_a_corrupted_chunk_is_detected_and_recomputed(catalog, clean_store, forward_calls, caplog):
    store = extract(catalog, "vits", shard_size=2)
    shard_file = Path(store.path) / "tokens" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[100:110] = bytes(b ^ 0xFF for b in data[100:110])  # inside the first chunk's float16 values
    shard_file.write_bytes(bytes(data))
    with pytest.raises(CorruptFeaturesError, match=r"image '001-.*\(row 2, shard 1\) fails its checksum.*--verify"):
        FeatureStore.open(store.path).read(2)
    forward_calls.clear()
    extract(catalog, "vits", shard_size=2)
    assert forward_calls == []  # without --verify, a complete store is not read back
    with caplog.at_level(logging.WARNING, logger="stages.features.stage"):
        repaired = extract(catalog, "vits", shard_size=2, verify=True)
    assert "features demo: shard(s) [1] failed their checksum and are recomputed" in caplog.text
    assert forward_calls == [2]
    assert_same_store(repaired, clean_store)


def test_run_needs_the_normalised_tables_and_a_backbone(tmp_path):
    with pytest.raises(StageError, match=r"'demo' is not normalised yet; run `pipeline run --stage normalize"):
        stage.run(context(write_catalog(tmp_path)))
    with pytest.raises(CatalogError, match=r"no backbone chosen; pass --backbone NAME .*defines: daisy, vits"):
        stage.run(context(write_catalog(tmp_path, default_backbone=None)))
    assert stage.status(context(write_catalog(tmp_path)), "demo") == StageStatus(0, None, "normalize first")


def test_status_and_open_features_need_no_model(catalog, monkeypatch):
    ctx = context(catalog)
    assert stage.status(ctx, "demo") == StageStatus(0, 1, "daisy: no features yet")
    with pytest.raises(FeatureStoreError, match=r"run `pipeline run --stage features --dataset demo --backbone daisy`"):
        stage.open_features(catalog, "demo")
    stage.run(ctx)
    monkeypatch.setattr(backbones, "create_backbone", None)  # any model load would now fail
    assert stage.open_features(catalog, "demo", "daisy").n_images == 6
    assert stage.status(ctx, "demo").complete


def test_any_timm_vit_fills_a_store_on_its_own_patch_grid(tmp_path, demo_data):
    vit = {"model": "vit_tiny_patch16_224.augreg_in21k", "weights": "random", "image_size": 64, "pos_embed": "timm"}
    path = write_catalog(tmp_path, data_root=demo_data, backbones={"vitt": vit}, default_backbone="vitt")
    catalog = load_catalog(path, environ={})
    stage.run(context(catalog))  # a worker compares its backbone's key parameters with the store's
    store = stage.open_features(catalog, "demo")
    assert (store.grid, store.dim, store.n_images) == ((4, 4), 192, 6) and not store.missing_shards()
    assert {transform["patch_size"] for transform in store.transforms} == {16}
    assert store.key_params["normalisation"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def test_worker_device_refuses_a_cluster_of_gpu_and_cpu_workers():
    assert stage.worker_device(SimpleNamespace(run=lambda _: {"tcp://a": False})) == "cpu"
    assert stage.worker_device(SimpleNamespace(run=lambda _: {"tcp://a": True})) == "cuda"
    mixed = SimpleNamespace(run=lambda _: {"tcp://a": True, "tcp://b": False})
    with pytest.raises(StageError, match=r"1 of 2 Dask workers have a GPU \(tcp://a\)"):
        stage.worker_device(mixed)
    with pytest.raises(StageError, match="the Dask cluster has no workers"):
        stage.worker_device(SimpleNamespace(run=lambda _: {}))


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, [*args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_runs_download_normalize_and_features_on_the_demo(tmp_path):
    datasets = {"demo": {"kind": "demo", "options": {"n_pairs": 2, "max_side": 128, "n_keypoints": 8}}}
    catalog_path = write_catalog(tmp_path, datasets=datasets)
    stages = ["--stage", "download", "--stage", "normalize", "--stage", "features"]
    for backbone in ("daisy", "vits"):
        invoke("--catalog", str(catalog_path), "-q", "run", "--dataset", "demo", *stages, "--backbone", backbone)
        store = stage.open_features(load_catalog(catalog_path, environ={}), "demo", backbone)
        assert store.n_images == 4 and store.missing_shards() == []
    status = invoke("--catalog", str(catalog_path), "status", "--dataset", "demo").splitlines()
    assert [line.split()[:4] for line in status[1:4]] == [
        ["demo", "download", "done", "1/1"],
        ["demo", "normalize", "done", "1/1"],
        ["demo", "features", "done", "1/1"],
    ]
    assert status[3].endswith(
        f"daisy: {Path(stage.open_features(load_catalog(catalog_path, environ={}), 'demo').path).name}"
    )
    vits = invoke("--catalog", str(catalog_path), "status", "--dataset", "demo", "--backbone", "vits").splitlines()
    assert vits[3].split()[:4] == ["demo", "features", "done", "1/1"] and "vits: " in vits[3]


def test_cli_computes_features_of_the_real_tss_sample(tmp_path, shared_fixtures):
    archive = tmp_path / "TSS_CVPR2016.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((shared_fixtures / "tss").rglob("*")):
            if path.is_file() and "TSS_CVPR2016" in path.parts:
                zf.write(path, path.relative_to(shared_fixtures / "tss"))
    source = {"url": "http://unreachable.invalid/TSS_CVPR2016.zip", "filename": archive.name}
    catalog_path = write_catalog(tmp_path, datasets={"tss": {"kind": "tss", "sources": [source]}})
    stages = ["--stage", "download", "--stage", "normalize", "--stage", "features"]
    invoke("--catalog", str(catalog_path), "-q", "run", "--dataset", "tss", *stages, "--archive", str(archive))
    store = stage.open_features(load_catalog(catalog_path, environ={}), "tss", "daisy")
    assert store.n_images == 6 and store.missing_shards() == []
    tokens, valid = store.read(list(range(6)))
    assert tokens.shape == (6, 8, 8, 104) and np.isfinite(tokens).all()
    sizes = [(t["width"], t["height"]) for t in store.transforms]
    assert sorted(sizes) == [(340, 212), (340, 240), (340, 255), (340, 255), (500, 340), (500, 375)]
    assert all(
        np.array_equal(v, CanvasTransform(**t).valid_patches()) for v, t in zip(valid, store.transforms, strict=True)
    )
