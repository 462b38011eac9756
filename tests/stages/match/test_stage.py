"""The match stage over real cached features: resuming after failures, any number of Dask workers, status."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from distributed import Client

from pipeline import results
from pipeline.catalog import Catalog, ClusterSpec, load_catalog
from pipeline.cli import cli
from pipeline.context import RunOptions, StageContext
from pipeline.errors import StageError
from pipeline.runner import run_stages
from stages.match import stage

CATALOG = {
    "stores": {"data_root": "data", "cache_root": "cache", "outputs": "outputs"},
    "datasets": {"demo": {"kind": "demo", "options": {"n_pairs": 3, "max_side": 96, "n_keypoints": 6}}},
    "backbones": {
        "daisy": {"model": "daisy", "weights": "none", "image_size": 112},
        "daisy-56": {"model": "daisy", "weights": "none", "image_size": 56},
        "vits-random": {"model": "vit_small_patch14_dinov2.lvd142m", "weights": "random", "image_size": 56},
    },
    "default_backbone": "daisy",
    "matchers": {
        "nn": {"method": "nn"},
        "gwot-fast": {"method": "gwot", "params": {"outer_iters": 3, "inner_iters": 20}},
    },
    "cluster": {"n_workers": 1, "processes": False},
}
IGNORED = ["solve_seconds"]  # timings differ from run to run


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Catalog:
    """A catalog whose demo dataset (3 pairs) is downloaded, normalised and has DAISY features."""
    folder = tmp_path_factory.mktemp("match")
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump(CATALOG))
    catalog = load_catalog(path, environ={})
    run_stages(catalog, ["download", "normalize", "features"], ["demo"], RunOptions(progress=False))
    return catalog


def context(catalog: Catalog, cluster: ClusterSpec | None = None, **options: object) -> StageContext:
    if cluster is not None:
        catalog = dataclasses.replace(catalog, cluster=cluster)
    return StageContext(catalog, ("demo",), RunOptions(progress=False, **options))


def table(catalog: Catalog, run: str, name: str = "pairs") -> pd.DataFrame:
    frame = results.read_results(results.run_dir(catalog.stores.outputs, run), name)
    order = ["matcher", "pair_id"] + (["kp_index"] if name == "keypoints" else [])
    return frame.drop(columns=IGNORED if name == "pairs" else []).sort_values(order).reset_index(drop=True)


def test_a_failed_batch_is_named_the_others_are_kept_and_a_rerun_completes_it(prepared, monkeypatch, tmp_path):
    monkeypatch.setattr(stage, "PAIRS_PER_BATCH", 1)
    original = stage.match_batch
    attempts = tmp_path / "attempts.txt"  # the task travels pickled: it reports through a file

    def poisoned(task: stage.BatchTask) -> int:
        if task.batch == 1 and task.setting.name == "gwot-fast":
            with attempts.open("a") as file:
                file.write(f"{task.pair_ids}\n")
            raise RuntimeError("poisoned batch")
        return original(task)

    monkeypatch.setattr(stage, "match_batch", poisoned)
    with pytest.raises(StageError, match=r"1 of 6 batch\(es\) failed twice(.|\n)*gwot-fast \(\w+\) batch 1, pairs "
                       r"001-chelsea: RuntimeError: poisoned batch"):  # fmt: skip
        stage.run(context(prepared, run_name="resumed"))
    assert attempts.read_text().splitlines() == ["['001-chelsea']"] * 2  # one retry
    run_folder = results.run_dir(prepared.stores.outputs, "resumed")
    partial = table(prepared, "resumed")
    assert sorted(zip(partial["matcher_name"], partial["pair_id"], strict=True)) == [
        ("gwot-fast", "000-astronaut"), ("gwot-fast", "002-coffee"),
        ("nn", "000-astronaut"), ("nn", "001-chelsea"), ("nn", "002-coffee"),
    ]  # fmt: skip
    kept = {p: p.stat().st_mtime_ns for p in (run_folder / "pairs").rglob("*.parquet")}

    monkeypatch.setattr(stage, "match_batch", original)
    stage.run(context(prepared, run_name="resumed"))
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())  # only the failed batch ran again
    stage.run(context(prepared, run_name="clean"))
    for name in ("pairs", "keypoints"):
        pd.testing.assert_frame_equal(table(prepared, "resumed", name), table(prepared, "clean", name))
    resumed = table(prepared, "resumed")
    assert (
        resumed.groupby("matcher")["pair_id"].apply(list).tolist()
        == [["000-astronaut", "001-chelsea", "002-coffee"]] * 2
    )
    status = stage.status(context(prepared, run_name="resumed"), "demo")
    assert (status.done, status.total, status.complete) == (6, 6, True)


@pytest.fixture
def external_scheduler(tmp_path):
    """A `dask scheduler` and one `dask worker` on 127.0.0.1, as separate processes; yields the address.

    The worker imports the stage module at start (``--preload``), while the test does other work.
    """
    dask = Path(sys.executable).parent / "dask"
    scheduler_file = tmp_path / "scheduler.json"
    common = ["--no-dashboard", "--scheduler-file", scheduler_file]
    commands = [
        [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", *common],
        [dask, "worker", "--nthreads", "1", "--no-nanny", "--preload", "stages.match.stage", *common],
    ]
    processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
    try:
        deadline = time.monotonic() + 30
        while not scheduler_file.is_file():
            if time.monotonic() > deadline or processes[0].poll() is not None:
                pytest.fail("the dask scheduler did not start within 30 s")
            time.sleep(0.1)
        yield yaml.safe_load(scheduler_file.read_text())["address"]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.mark.slow
def test_one_two_and_external_workers_write_the_same_tables(prepared, monkeypatch, external_scheduler):
    monkeypatch.setattr(stage, "PAIRS_PER_BATCH", 2)
    matchers = ("nn", "gwot-fast")
    stage.run(context(prepared, run_name="1-worker", matchers=matchers))  # a thread of this process
    stage.run(context(prepared, ClusterSpec(n_workers=2), run_name="2-workers", matchers=matchers))
    with Client(external_scheduler, timeout="30s") as client:
        client.wait_for_workers(1, timeout=60)
    options = ["--stage", "match", "--dataset", "demo", "--run", "external", "--scheduler", external_scheduler]
    result = CliRunner().invoke(
        cli, ["--catalog", prepared.path, "-q", "run", *options, "--matcher", "nn", "--matcher", "gwot-fast"]
    )
    assert result.exit_code == 0, result.output
    reference = {name: table(prepared, "1-worker", name) for name in ("pairs", "keypoints")}
    assert len(reference["pairs"]) == 6 and len(reference["keypoints"]) == 6 * 6
    for run in ("2-workers", "external"):
        for name, expected in reference.items():
            pd.testing.assert_frame_equal(table(prepared, run, name), expected)


def test_missing_inputs_name_the_command_to_run(prepared, tmp_path):
    with pytest.raises(StageError, match=r"run `pipeline run --stage features --dataset demo --backbone daisy-56`"):
        stage.run(context(prepared, backbone="daisy-56"))
    elsewhere = dataclasses.replace(prepared, stores=dataclasses.replace(prepared.stores, data_root=str(tmp_path)))
    with pytest.raises(StageError, match=r"dataset 'demo' is not normalised yet; run `pipeline run --stage normalize"):
        stage.run(context(elsewhere))
    assert not stage.status(context(elsewhere), "demo").complete


def test_every_row_from_random_weights_says_so(prepared):
    options = RunOptions(progress=False, backbone="vits-random", matchers=("nn",), run_name="random")
    run_stages(prepared, ["features", "match"], ["demo"], options)
    run_folder = results.run_dir(prepared.stores.outputs, "random")
    for name in ("pairs", "keypoints"):
        assert len(results.read_results(run_folder, name)) > 0
    pairs = results.read_results(run_folder)
    assert pairs["random_weights"].all() and pairs["backbone_key"].str.contains("-RANDOM-").all()
    assert "| vits-random (RANDOM weights) |" in (run_folder / "summary.md").read_text()


def test_gwot_rows_record_their_convergence_and_the_run_warns_once(prepared, caplog):
    options = RunOptions(progress=False, matchers=("nn", "gwot-fast"), run_name="convergence")
    with caplog.at_level("WARNING", logger="stages.match.stage"):
        run_stages(prepared, ["match"], ["demo"], options)
    pairs = results.read_results(results.run_dir(prepared.stores.outputs, "convergence"))
    gwot_rows, nn_rows = pairs[pairs["method"] == "gwot"], pairs[pairs["method"] == "nn"]
    assert nn_rows[list(stage.SOLVER_COLUMNS)].isna().all().all()
    assert gwot_rows["outer_steps"].between(1, 3).all() and (gwot_rows["inner_iters"] >= gwot_rows["outer_steps"]).all()
    assert gwot_rows["objective"].notna().all() and (gwot_rows["marginal_error"] >= 0).all()
    # 3 outer steps do not converge on DAISY features: the pairs say so and the run warns once for the setting
    unconverged = int((~gwot_rows["converged"].astype(bool)).sum())
    assert unconverged == int((gwot_rows["outer_steps"] == 3).sum()) > 0
    warnings = [r.getMessage() for r in caplog.records if "did not converge" in r.getMessage()]
    assert warnings == [
        f"match: {unconverged} of {len(gwot_rows)} pair(s) of gwot-fast did not converge within outer_iters (the "
        "pairs table's converged column); raise outer_iters (--set NAME.outer_iters=...) or eps for smoother plans"
    ]
