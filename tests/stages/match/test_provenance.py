"""Provenance: versions, commit, device and date in a run's config.json and in every result part; the code
versions in the setting and feature keys."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

import pipeline
from pipeline import results
from pipeline.catalog import load_catalog
from pipeline.cli import cli
from pipeline.errors import PipelineError
from pipeline.provenance import git_commit, provenance
from stages.features import stage as features_stage
from tests.catalogs import write_demo_catalog

REPO = Path(__file__).resolve().parents[3]


def test_provenance_names_the_commit_the_versions_the_device_and_the_date():
    record = provenance("cpu")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert record["git_commit"] == git_commit() and git_commit().removesuffix("-dirty") == head.stdout.strip()
    assert record["version"] == pipeline.__version__
    for library in ("torch", "timm", "zarr", "dask"):
        assert record["libraries"][library] == metadata.version(library)
    assert record["libraries"].get("pot") == metadata.version("pot")  # POT is installed with the test extras
    assert record["device"] == "cpu" and record["date"].endswith("+00:00")


@pytest.fixture(scope="module")
def matched(tmp_path_factory) -> Path:
    """A demo run matched with NN on DAISY features: its catalog."""
    catalog = write_demo_catalog(tmp_path_factory.mktemp("provenance"), n_pairs=2, matchers={"nn": {"method": "nn"}})
    result = CliRunner().invoke(cli, ["--catalog", str(catalog), "-q", "run", "--dataset", "demo"])
    assert result.exit_code == 0, result.output
    return catalog


def test_config_and_every_part_record_their_provenance(matched):
    run = matched.parent / "outputs" / "default"
    config = results.read_run_config(run)
    recorded = config["provenance"]
    assert recorded["version"] == pipeline.__version__ and recorded["git_commit"] == git_commit()
    assert recorded["libraries"]["torch"] == metadata.version("torch") and recorded["device"] == "cpu"
    parts = sorted(run.glob("*/dataset=demo/matcher=nn/setting=*/part-*.parquet"))
    assert {part.parts[-5] for part in parts} == {"pairs", "keypoints"}
    for part in parts:
        stored = results.read_provenance(part)
        assert stored["git_commit"] == git_commit() and stored["libraries"] == recorded["libraries"]
        assert stored["device"] == "cpu"
    (setting,) = config["settings"].values()
    assert setting["implementation"] == 1


def test_a_new_features_version_names_a_new_store(matched, monkeypatch):
    catalog = load_catalog(matched)
    spec = catalog.backbone("daisy")
    before = features_stage.store_key_params(spec, "cpu")
    assert before["implementation"] == features_stage.FEATURES_VERSION
    assert features_stage.open_features(catalog, "demo").key_params == before
    monkeypatch.setattr(features_stage, "FEATURES_VERSION", features_stage.FEATURES_VERSION + 1)
    after = features_stage.store_key_params(spec, "cpu")
    assert features_stage.features_path(catalog, "demo", after) != features_stage.features_path(catalog, "demo", before)
    with pytest.raises(PipelineError, match="run `pipeline run --stage features --dataset demo"):
        features_stage.open_features(catalog, "demo")  # the old code's features are not taken as computed
