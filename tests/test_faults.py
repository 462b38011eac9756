"""Damaged records on disk, end to end: each is reported in one line, set aside, and healed by the next run.

A module-scoped run of the offline demo (DAISY features, the NN matcher, two batches) is copied into each
test's folder; the test damages one record, checks that ``pipeline status`` names it without a traceback,
runs the pipeline again and checks that the results equal the undamaged run's and that only the damaged
unit was recomputed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cache import TEMP_MARK, Ledger
from pipeline.cli import cli
from tests.stages.datasets.synthetic import write_pfpascal, write_pfpascal_csv

CATALOG = {
    "stores": {"data_root": "data", "cache_root": "cache", "outputs": "outputs"},
    "datasets": {"demo": {"kind": "demo", "options": {"n_pairs": 18, "max_side": 96, "n_keypoints": 6}}},
    "backbones": {"daisy": {"model": "daisy", "weights": "none", "image_size": 112}},
    "default_backbone": "daisy",
    "matchers": {"nn": {"method": "nn"}},
    "cluster": {"n_workers": 1, "processes": False},
}
STAGES = ("--stage", "download", "--stage", "normalize", "--stage", "features", "--stage", "match")
RESULT_COLUMNS = ["dataset", "matcher", "setting", "pair_id", "n_kps", "n_correct", "pck", "flow_accuracy"]


def invoke(folder: Path, *args: str, ok: bool = True):
    """Run the CLI on ``folder``'s catalog; ``ok``: assert success. Never lets an exception through."""
    result = CliRunner().invoke(cli, ["--catalog", str(folder / "catalog.yaml"), "-q", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    if ok:
        assert result.exit_code == 0, result.output
    return result


def results(folder: Path) -> pd.DataFrame:
    """The run's pair results, comparable across runs (no timings, sorted)."""
    pairs = pd.read_parquet(folder / "outputs" / "default" / "pairs")[RESULT_COLUMNS]
    pairs = pairs.astype({"dataset": str, "matcher": str, "setting": str})
    for column in ("n_correct", "pck", "flow_accuracy"):
        pairs[column] = pairs[column].map(lambda values: None if values is None else list(values))
    return pairs.sort_values(["matcher", "pair_id"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("baseline")
    (folder / "catalog.yaml").write_text(yaml.safe_dump(CATALOG))
    invoke(folder, "run", *STAGES)
    return folder


@pytest.fixture
def demo(baseline, tmp_path) -> Path:
    """A private copy of the baseline run."""
    folder = tmp_path / "demo"
    shutil.copytree(baseline, folder)
    return folder


def parts(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (folder / "outputs" / "default").rglob("part-*.parquet")}


def truncate(path: Path, keep: int = 7) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def damaged_aside(path: Path) -> bool:
    return path.with_name(f".{path.name}.damaged").exists()


def status_shows(folder: Path, path: Path) -> str:
    """``pipeline status`` succeeds, lists ``path`` as damaged and moves nothing."""
    output = invoke(folder, "status").output
    assert "damaged: " in output and str(path) in output, output
    assert not damaged_aside(path)
    return output


def test_the_baseline_has_two_batches_and_a_clean_status(baseline):
    assert len(parts(baseline)) == 4
    output = invoke(baseline, "status").output
    states = [line.split()[2] for line in output.splitlines()[1:]]
    assert "damaged" not in output and states == ["done"] * 4 + ["missing"], output


@pytest.mark.parametrize(
    "marker",
    [
        "outputs/default/.done/demo__{key}__00001.json",
        "data/normalized/demo/.done/normalized.json",
        "data/raw/demo/.done/materialize.json",
    ],
)
def test_a_truncated_ledger_marker_is_reported_set_aside_and_redone(demo, baseline, marker):
    key = next((demo / "outputs" / "default" / "pairs" / "dataset=demo").glob("matcher=*/setting=*")).name[8:]
    path = demo / marker.format(key=key)
    truncate(path)
    status_shows(demo, path)
    before = parts(demo)
    invoke(demo, "run", *STAGES)
    assert json.loads(path.read_text())["unit"]
    assert damaged_aside(path) or "raw" in marker  # the generated demo is generated afresh, folder and all
    pd.testing.assert_frame_equal(results(demo), results(baseline))
    if "outputs" in marker:  # only the damaged batch was matched again
        changed = [p for p, mtime in parts(demo).items() if before[p] != mtime]
        assert sorted(p.name for p in changed) == ["part-00001.parquet"] * 2
    assert "damaged" not in invoke(demo, "status").output


def test_a_flipped_byte_in_the_features_done_array_recomputes_that_shard(demo, baseline):
    store = next((demo / "cache" / "features" / "demo").glob("*.zarr"))
    chunk = store / "done" / "c" / "1"
    flip_byte(chunk, 0)
    status_shows(demo, chunk)
    result = invoke(demo, "run", "--stage", "features", "--stage", "match")
    assert damaged_aside(chunk)
    assert "Traceback" not in result.output
    pd.testing.assert_frame_equal(results(demo), results(baseline))
    assert "damaged" not in invoke(demo, "status").output


@pytest.mark.parametrize("metadata", ["tokens/zarr.json", "done/zarr.json", "zarr.json"])
def test_truncated_zarr_metadata_is_rebuilt_or_the_store_recomputed(demo, baseline, metadata):
    store = next((demo / "cache" / "features" / "demo").glob("*.zarr"))
    truncate(store / metadata)
    status_shows(demo, store / metadata)
    invoke(demo, "run", *STAGES)
    if metadata == "zarr.json":  # the group's attributes are gone: the whole store is set aside
        assert damaged_aside(store)
    else:
        assert damaged_aside(store / metadata)
    pd.testing.assert_frame_equal(results(demo), results(baseline))
    assert "damaged" not in invoke(demo, "status").output


def test_a_damaged_shard_index_is_set_aside_by_verify_and_recomputed(demo, baseline):
    store = next((demo / "cache" / "features" / "demo").glob("*.zarr"))
    shard = store / "tokens" / "c" / "0" / "0" / "0" / "0"
    flip_byte(shard, shard.stat().st_size - 6)  # inside the shard's index
    verified = invoke(demo, "run", "--stage", "features", "--verify")
    assert "damaged: " in verified.output and str(shard) in verified.output
    assert damaged_aside(shard)
    invoke(demo, "run", "--stage", "match")
    pd.testing.assert_frame_equal(results(demo), results(baseline))
    assert "verify: every record read back intact" in invoke(demo, "run", *STAGES, "--verify").output


def test_match_names_a_damaged_feature_shard_and_the_command_that_recomputes_it(demo, baseline):
    store = next((demo / "cache" / "features" / "demo").glob("*.zarr"))
    shard = store / "tokens" / "c" / "1" / "0" / "0" / "0"
    flip_byte(shard, shard.stat().st_size // 2)  # inside a chunk of shard 1
    failed = invoke(demo, "run", "--stage", "match", "--force", ok=False)
    assert failed.exit_code == 1 and "shard 1) fails its checksum" in failed.output
    command = "pipeline run --stage features --stage match --dataset demo --backbone daisy"
    assert f"demo: feature shard(s) [1] are damaged and now marked for recomputation: run `{command}`" in failed.output
    assert damaged_aside(shard)
    invoke(demo, *command.split()[1:])
    pd.testing.assert_frame_equal(results(demo), results(baseline))


@pytest.mark.parametrize("table", ["pairs", "keypoints"])
def test_a_corrupted_results_part_is_recomputed_alone(demo, baseline, table):
    path = next((demo / "outputs" / "default" / table).rglob("part-00000.parquet"))
    flip_byte(path, path.stat().st_size // 2)
    status_shows(demo, path)
    before = parts(demo)
    invoke(demo, "run", "--stage", "match")
    assert damaged_aside(path)
    changed = sorted(p.name for p, mtime in parts(demo).items() if before[p] != mtime)
    assert changed == ["part-00000.parquet"] * 2
    pd.testing.assert_frame_equal(results(demo), results(baseline))


def test_a_deleted_results_part_shows_in_status_and_is_recomputed(demo, baseline):
    path = next((demo / "outputs" / "default" / "pairs").rglob("part-00001.parquet"))
    path.unlink()
    output = invoke(demo, "status").output
    assert "match      partial           1/2" in output and str(path) in output
    printed = invoke(demo, "run", "--stage", "match").output
    pd.testing.assert_frame_equal(results(demo), results(baseline))
    summary, expected = (pd.read_parquet(f / "outputs" / "default" / "summary.parquet") for f in (demo, baseline))
    pd.testing.assert_frame_equal(summary, expected)
    assert "| demo | all | nn |" in printed


def test_a_corrupted_normalised_table_is_set_aside_and_normalised_again(demo, baseline):
    path = demo / "data" / "normalized" / "demo" / "pairs.parquet"
    flip_byte(path, path.stat().st_size // 2)
    status_shows(demo, path)
    failed = invoke(demo, "run", "--stage", "match", ok=False)
    assert failed.exit_code == 1 and "not normalised yet" in failed.output and damaged_aside(path)
    before = parts(demo)
    invoke(demo, "run", *STAGES)
    pd.testing.assert_frame_equal(results(demo), results(baseline))
    assert parts(demo) == before  # the same pairs: nothing matched again


def test_a_forced_match_that_fails_keeps_the_committed_results(demo, baseline):
    store = next((demo / "cache" / "features" / "demo").glob("*.zarr"))
    shutil.move(store, store.with_name("elsewhere"))
    failed = invoke(demo, "run", "--stage", "match", "--force", ok=False)
    assert failed.exit_code == 1
    shutil.move(store.with_name("elsewhere"), store)
    assert "match      done" in invoke(demo, "status").output
    pd.testing.assert_frame_equal(results(demo), results(baseline))


def pfpascal_catalog(folder: Path) -> Path:
    """A PF-PASCAL dataset whose raw files are the synthetic tree, recorded as downloaded in its ledger."""
    sources = [{"url": "http://127.0.0.1:9/PF-dataset-PASCAL.zip", "filename": "PF-dataset-PASCAL.zip"}]
    catalog = {"stores": CATALOG["stores"], "datasets": {"pfp": {"kind": "pf-pascal", "sources": sources}}}
    (folder / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    raw = folder / "data" / "raw" / "pfp"
    write_pfpascal(raw, dataset="pfp")
    for unit in ("fetch:PF-dataset-PASCAL.zip", "extract:PF-dataset-PASCAL.zip"):
        Ledger(raw / ".done").mark_done(unit, {"sha256": "0" * 64})
    return raw


def test_an_empty_pair_list_is_an_error_naming_it_and_force_keeps_the_old_tables(tmp_path):
    raw = pfpascal_catalog(tmp_path)
    invoke(tmp_path, "run", "--stage", "normalize")
    tables = tmp_path / "data" / "normalized" / "pfp"
    before = {name: (tables / name).read_bytes() for name in ("images.parquet", "pairs.parquet")}
    status = invoke(tmp_path, "status").output
    write_pfpascal_csv(raw / "test_pairs_pf_pascal.csv", [])  # the header alone

    failed = invoke(tmp_path, "run", "--stage", "normalize", "--force", ok=False)
    assert failed.exit_code == 1
    assert failed.output.strip().splitlines()[-1] == (
        f"error: {raw / 'test_pairs_pf_pascal.csv'}: split 'test' of dataset 'pfp' has no pairs after "
        "normalisation; check the file, or pass --skip-bad to keep an empty split"
    )
    assert {name: (tables / name).read_bytes() for name in before} == before  # the old tables stay committed
    assert invoke(tmp_path, "status").output == status

    invoke(tmp_path, "run", "--stage", "normalize", "--force", "--skip-bad")
    assert pd.read_parquet(tables / "pairs.parquet").empty
    refused = invoke(tmp_path, "run", "--stage", "match", ok=False)
    assert refused.exit_code == 1 and "has no pairs of split 'test'" in refused.output


@pytest.mark.parametrize("root", ["data", "cache", "outputs"])
def test_a_store_root_that_is_a_file_stops_the_run_before_any_work(tmp_path, root):
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(CATALOG))
    (tmp_path / root).write_text("a file where a folder should be")
    failed = invoke(tmp_path, "run", *STAGES, ok=False)
    setting = {"data": "data_root", "cache": "cache_root", "outputs": "outputs"}[root]
    assert failed.output.splitlines() == [
        f"error: stores.{setting} {tmp_path / root} is a file, not a folder; point it at a folder you can write"
    ]
    assert not (tmp_path / "data" / "raw").exists() or root == "data"


def leftover_temporaries(folder: Path) -> list[Path]:
    """Temporaries of atomic writes, Zarr's partial writes and extraction staging under ``folder``."""
    return [p for p in folder.rglob("*") if TEMP_MARK in p.name or p.name.endswith(".partial") or p.name == ".staging"]


KILL_POINTS = [  # (what has just happened, a file that shows it)
    ("the demo is being generated", "data/raw"),
    ("normalised", "data/normalized/demo/.done/normalized.json"),
    ("the feature store is created", "cache/features/demo/*.zarr/zarr.json"),
    ("matching started", "outputs/default/config.json"),
    ("a batch is committed", "outputs/default/.done/*.json"),
]


@pytest.mark.slow
def test_runs_killed_at_several_points_resume_to_identical_results_without_temporaries(tmp_path, baseline):
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(CATALOG))
    main = "from pipeline.cli import main; main()"
    command = [sys.executable, "-c", main, "--catalog", str(tmp_path / "catalog.yaml"), "-q", "run", *STAGES]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = []
    for what, pattern in KILL_POINTS:
        run = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while run.poll() is None and not any(tmp_path.glob(pattern)):
            time.sleep(0.01)
        if run.poll() is None:
            run.send_signal(signal.SIGKILL)
            killed.append(what)
        run.wait()
    assert len(killed) >= 3, killed  # most points are reached before the run could finish
    final = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    pd.testing.assert_frame_equal(results(tmp_path), results(baseline))
    assert leftover_temporaries(tmp_path) == []


def test_a_truncated_run_config_is_set_aside_and_written_afresh(demo, baseline):
    path = demo / "outputs" / "default" / "config.json"
    truncate(path)
    status_shows(demo, path)
    invoke(demo, "run", "--stage", "match")
    assert damaged_aside(path)
    assert json.loads(path.read_text())["datasets"]["demo"]["n_pairs"] == 18
    pd.testing.assert_frame_equal(results(demo), results(baseline))
