"""The match stage through the command line: demo and TSS end to end, TSS export and the official scoring."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from pipeline import results
from pipeline.cli import cli

IN_PROCESS = {"n_workers": 1, "processes": False}
DAISY = {"daisy": {"model": "daisy", "weights": "none", "image_size": 112}}


def write_catalog(folder: Path, datasets: dict) -> Path:
    body = {
        "stores": {"data_root": "data", "cache_root": "cache", "outputs": "outputs"},
        "datasets": datasets,
        "backbones": DAISY,
        "default_backbone": "daisy",
        "matchers": {"nn": {"method": "nn"}, "gwot": {"method": "gwot"}},
        "cluster": IN_PROCESS,
    }
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def invoke(catalog: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--catalog", str(catalog), "-q", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


THRESHOLDS = [f"T{t}" for t in range(1, 51)]


def test_score_tss_reproduces_the_official_kit(tmp_path, shared_fixtures):
    tss = shared_fixtures / "tss"
    official = read_csv(tss / "official-results" / "JODS" / "scores.csv")
    catalog = write_catalog(tmp_path, {})
    for results_dir, dataset_dir in (
        (tss / "official-results" / "JODS", tss / "TSS_CVPR2016" / "JODS"),  # one subset's folder
        (tss / "official-results", tss / "TSS_CVPR2016"),  # the kit's layout: <subset>/<pair>
    ):
        out = tmp_path / "scores.csv"
        printed = invoke(catalog, "score-tss", str(results_dir), "--dataset-dir", str(dataset_dir), "--out", str(out))
        ours = read_csv(out)
        assert [row["Subset"] for row in ours] == ["JODS"] * 6
        for mine, theirs in zip(ours, official, strict=True):  # the kit names both directions "_1to2"
            assert mine["Row"].rsplit("_", 1)[0] == theirs["Row"].rsplit("_", 1)[0]
            for column in ("SegIUR", *THRESHOLDS):
                assert float(mine[column]) == pytest.approx(float(theirs[column]), abs=1e-5)
        assert printed.splitlines()[1:] == [
            "JODS     Average                     1 0.800570",
            "JODS     w/o flip                    0 0.800570",
        ]


def test_demo_end_to_end_gwot_beats_nearest_neighbours(tmp_path):
    demo = {
        "demo": {
            "kind": "demo",
            "options": {
                "n_pairs": 4,
                "max_side": 128,
                "n_keypoints": 10,
                "smaller_fraction": 0.0,
                "larger_fraction": 0.0,
            },
        }
    }
    catalog = write_catalog(tmp_path, demo)
    invoke(catalog, "run", "--stage", "download", "--stage", "normalize", "--stage", "features", "--dataset", "demo")
    printed = invoke(catalog, "run", "--stage", "match", "--dataset", "demo", "--matcher", "nn", "--matcher", "gwot")
    run = tmp_path / "outputs" / "default"
    assert "| demo | all | gwot | daisy |" in printed and "| demo | all | nn | daisy |" in printed

    pairs = pd.read_parquet(run / "pairs")  # as the README shows
    keypoints = pd.read_parquet(run / "keypoints")
    ids = ["000-astronaut", "001-chelsea", "002-coffee", "003-rocket"]
    for label in ("nn", "gwot"):
        assert sorted(pairs.loc[pairs["matcher"] == label, "pair_id"]) == ids  # each pair exactly once
    assert len(keypoints) == 2 * 4 * 10 and not keypoints.duplicated(["matcher", "pair_id", "kp_index"]).any()
    assert set(pairs["dataset"]) == {"demo"} and not pairs["random_weights"].any()
    at_01 = pairs["alphas"].map(list).map(lambda alphas: alphas.index(0.1))
    correct = pairs["n_correct"].map(list).combine(at_01, lambda counts, i: counts[i])
    pooled = correct.groupby(pairs["matcher"]).sum() / pairs.groupby("matcher")["n_kps"].sum()

    summary = pd.read_parquet(run / "summary.parquet")
    pck = summary[(summary["metric"] == "pck") & np.isclose(summary["threshold"], 0.1)]
    by = pck.set_index(["matcher", "averaging"])["value"]
    assert set(pck["averaging"]) == {"per_image", "per_keypoint"}
    assert by[("gwot", "per_keypoint")] == pytest.approx(pooled["gwot"])
    assert by[("gwot", "per_keypoint")] > by[("nn", "per_keypoint")]
    assert by[("gwot", "per_image")] > by[("nn", "per_image")]
    assert "PCK@0.1 img | PCK@0.1 kp" in (run / "summary.md").read_text()

    parts = {p: p.stat().st_mtime_ns for p in run.rglob("part-*.parquet")}
    again = invoke(catalog, "run", "--stage", "match", "--dataset", "demo", "--matcher", "nn", "--matcher", "gwot")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("part-*.parquet")} == parts  # nothing recomputed
    assert again == printed

    swept = invoke(catalog, "run", "--stage", "match", "--matcher", "nn", "--set", "nn.temperature=0.05,0.1")
    assert "nn[temperature=0.05]" in swept and "nn[temperature=0.1]" in swept
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in parts.items())
    config = json.loads((run / "config.json").read_text())
    assert sorted(s["label"] for s in config["settings"].values()) == [
        "gwot", "nn", "nn[temperature=0.05]", "nn[temperature=0.1]",
    ]  # fmt: skip
    assert len(pd.read_parquet(run / "pairs")) == 4 * 4
    assert sorted(p.name for p in (run / "pairs" / "dataset=demo").iterdir()) == [
        "matcher=gwot", "matcher=nn", "matcher=nn[temperature=0.05]", "matcher=nn[temperature=0.1]",
    ]  # fmt: skip

    # Another run of settings the first one finished takes its parts (hard links), computing nothing; the
    # default eps given by --set is the catalog's gwot under another label (the parts hold no label).
    command = ["--catalog", str(catalog), "run", "--stage", "match", "--matcher", "nn", "--matcher", "gwot"]
    reused = CliRunner().invoke(cli, [*command, "--set", "gwot.eps=0.02", "--run", "again"], catch_exceptions=False)
    assert reused.exit_code == 0, reused.output
    line = "match: reused 2 batch(es) of gwot[eps=0.02], nn finished by run(s) default (linked, not recomputed)"
    assert line in reused.output and "to compute" not in reused.output
    again = tmp_path / "outputs" / "again"
    linked = {p.stat().st_ino for p in again.rglob("part-*.parquet")}
    originals = [p for label in ("nn", "gwot") for p in run.glob(f"*/dataset=demo/matcher={label}/*/part-*.parquet")]
    assert linked == {p.stat().st_ino for p in originals} and len(linked) == 4
    theirs = results.read_results(again).sort_values(["setting", "pair_id"])
    mine = results.read_results(run).query("matcher in ['nn', 'gwot']").sort_values(["setting", "pair_id"])
    columns = [name for name in mine.columns if name != "matcher"]
    assert theirs[columns].reset_index(drop=True).to_json() == mine[columns].reset_index(drop=True).to_json()
    assert sorted(set(theirs["matcher"])) == ["gwot[eps=0.02]", "nn"]
    assert "| demo | all | gwot[eps=0.02] | daisy |" in reused.output

    # Within a run, a setting keeps the label it was first filed under: the same --set finds gwot's parts.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("part-*.parquet")}
    same = invoke(catalog, "run", "--stage", "match", "--matcher", "gwot", "--set", "gwot.eps=0.02")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("part-*.parquet")} == before and "damaged" not in same
    assert "| demo | all | gwot | daisy |" in same


def test_tss_end_to_end_and_its_exported_flows_score_as_stored(tmp_path, shared_fixtures):
    archive = shutil.make_archive(
        str(tmp_path / "TSS_CVPR2016"), "zip", root_dir=shared_fixtures / "tss", base_dir="TSS_CVPR2016"
    )
    sources = [{"url": "http://127.0.0.1:9/TSS_CVPR2016.zip", "filename": "TSS_CVPR2016.zip"}]
    catalog = write_catalog(tmp_path, {"tss": {"kind": "tss", "sources": sources}})
    stages = ["--stage", "download", "--stage", "normalize", "--stage", "features", "--stage", "match"]
    invoke(catalog, "run", *stages, "--dataset", "tss", "--archive", archive, "--matcher", "nn", "--run", "t")

    pairs = pd.read_parquet(tmp_path / "outputs" / "t" / "pairs")
    assert sorted(pairs["pair_id"]) == [
        f"{group}/{direction}"
        for group in ("JODS/car_01_02", "JODS/car_03_04", "PASCAL/bike_01_02")
        for direction in ("1to2", "2to1")
    ]
    assert all(len(accuracy) == 50 for accuracy in pairs["flow_accuracy"])
    assert (pairs["n_kps"] > 0).all()  # corr.txt matches are scored as keypoints too

    exported = tmp_path / "exported"
    assert invoke(catalog, "export-tss", "--run", "t", "--matcher", "nn", "--out", str(exported)).startswith(
        "exported the flows of 3 pair(s)"
    )
    invoke(catalog, "score-tss", str(exported), "--out", str(tmp_path / "scores.csv"))
    rescored = {
        f"{row['Subset']}/{row['Row'].rsplit('_', 1)[0]}/{row['Row'].rsplit('_', 1)[1]}": [
            float(row[t]) for t in THRESHOLDS
        ]
        for row in read_csv(tmp_path / "scores.csv")
        if row["Row"] not in ("Average", "w/o flip")
    }
    stored = dict(zip(pairs["pair_id"], pairs["flow_accuracy"].map(list), strict=True))
    assert rescored.keys() == stored.keys()
    for pair_id, accuracy in stored.items():
        np.testing.assert_allclose(rescored[pair_id], accuracy, atol=1e-12)
