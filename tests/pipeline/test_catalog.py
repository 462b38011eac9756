"""The catalog loader: the shipped catalog is valid, and every kind of mistake is named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.catalog import REPO_CATALOG, load_catalog
from pipeline.errors import CatalogError

MINIMAL = """
stores: {data_root: d, cache_root: c, outputs: o}
datasets:
  tss: {kind: tss, sources: [{url: "http://127.0.0.1:1/x.zip", filename: x.zip}]}
backbones:
  small: {model: vit_small_patch14_dinov2.lvd142m, weights: random, image_size: 224}
matchers:
  nn: {method: nn}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path


def test_shipped_catalog_loads_with_every_benchmark():
    catalog = load_catalog(REPO_CATALOG)
    assert {"tss", "pf-pascal", "pf-willow", "spair", "demo"} <= set(catalog.datasets)
    spair = catalog.dataset("spair")
    assert spair.sources[0].size == 226_961_117 and spair.splits == ("test",)
    assert catalog.default_backbone in catalog.backbones
    assert catalog.backbone("dinov2_vitb14").model == "vit_base_patch14_dinov2.lvd142m"
    assert {"nn", "gwot"} <= set(catalog.matchers)


def test_relative_roots_resolve_against_the_catalog_folder(tmp_path):
    catalog = load_catalog(write(tmp_path, MINIMAL), environ={})
    assert catalog.stores.data_root == str(tmp_path / "d")
    assert catalog.raw_dir("tss") == tmp_path / "d" / "raw" / "tss"
    assert catalog.normalized_dir("tss") == tmp_path / "d" / "normalized" / "tss"


def test_environment_overrides_roots(tmp_path):
    env = {"PIPELINE_DATA_ROOT": str(tmp_path / "elsewhere"), "PIPELINE_OUTPUTS": "s3://bucket/out"}
    catalog = load_catalog(write(tmp_path, MINIMAL), environ=env)
    assert catalog.stores.data_root == str(tmp_path / "elsewhere")
    assert catalog.stores.outputs == "s3://bucket/out"
    assert catalog.stores.cache_root == str(tmp_path / "c")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "colour: blue\n", r"unknown top-level key\(s\) 'colour'; valid: stores"),
        (
            MINIMAL.replace("data_root: d", "data_rot: d"),
            r"stores: unknown key\(s\) 'data_rot'; valid keys are",
        ),
        (MINIMAL.replace("filename: x.zip", "name2: x.zip"), r"datasets\.tss\.sources\[0\]: unknown key"),
        (
            MINIMAL.replace(", filename: x.zip", ""),
            r"datasets\.tss\.sources\[0\]: missing required key 'filename'",
        ),
        (
            MINIMAL.replace("image_size: 224", "image_size: big"),
            r"backbones\.small\.image_size: expected an integer",
        ),
        (
            MINIMAL.replace("{kind: tss,", "{kind: tsss,"),
            r"datasets\.tss\.kind: unknown dataset kind 'tsss'; valid:",
        ),
        (
            MINIMAL.replace("method: nn", "method: knn"),
            r"matchers\.nn\.method: 'knn' is not one of 'nn', 'gwot'",
        ),
        (MINIMAL + "cluster: {n_workers: two}\n", r"cluster\.n_workers: expected an integer"),
        (MINIMAL + "  nn: {method: gwot}\n", r"duplicate name 'nn'"),
        (MINIMAL + "default_backbone: huge\n", r"default_backbone: 'huge' is not one of small"),
        ("- a\n- b\n", r"expected a mapping at the top level"),
        ("stores: [\n", r"not valid YAML"),
    ],
)
def test_bad_catalog_names_the_key_and_the_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(CatalogError, match=message) as info:
        load_catalog(path, environ={})
    assert str(path) in str(info.value)


def test_missing_catalog_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(CatalogError, match=r"cannot read the catalog .*pass --catalog PATH"):
        load_catalog(tmp_path / "nope.yaml")


def test_unknown_names_list_the_known_ones(tmp_path):
    catalog = load_catalog(write(tmp_path, MINIMAL), environ={})
    with pytest.raises(CatalogError, match=r"unknown dataset 'spair'; the catalog defines: tss"):
        catalog.dataset("spair")
    with pytest.raises(CatalogError, match=r"unknown matcher 'gwot'; the catalog defines: nn"):
        catalog.matcher("gwot")


def test_relative_weights_files_resolve_against_the_catalog_folder(tmp_path):
    text = MINIMAL.replace("weights: random", "weights: models/small.safetensors")
    catalog = load_catalog(write(tmp_path, text), environ={})
    assert catalog.backbone("small").weights == str(tmp_path / "models" / "small.safetensors")
