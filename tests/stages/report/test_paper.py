"""The paper tables: numbers against pandas computations from the Parquet files, bootstrap intervals, bold
best values, the CSV files, and the section in a real demo report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline import results
from pipeline.cli import cli
from stages.report import paper
from stages.report.html import Strong, render_html, render_markdown
from stages.report.tables import load_run
from tests.catalogs import write_demo_catalog

KINDS = {"spair": "spair", "pfp": "pf-pascal", "willow": "pf-willow", "tss": "tss"}
SETTINGS = {"aaaaaaaaaaaa": ("nn", "nn"), "bbbbbbbbbbbb": ("gwot[eps=0.05]", "gwot")}
THRESHOLDS = {"spair": "trg_bbox", "pfp": "trg_image", "willow": "trg_kps"}


def pair_row(pair_id: str, category: str, setting: str, **columns) -> dict:
    _, method = SETTINGS[setting]
    row = {
        "pair_id": pair_id, "split": "test", "category": category, "src_image_id": "a", "trg_image_id": "b",
        "matcher_name": method.split("[")[0], "method": method, "params_json": "{}",
        "backbone": "daisy", "backbone_key": "daisy-112-0", "random_weights": False, "batch": 0,
        "threshold_kind": "trg_image", "alphas": [], "n_correct": [], "pck": [], "flip": False,
        "solve_seconds": 0.1, "n_kps": 0,
    }  # fmt: skip
    return {**row, **columns}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run of two settings over SPair-, PF-PASCAL-, PF-WILLOW- and TSS-like datasets, written as parts."""
    folder = tmp_path_factory.mktemp("paper") / "run"
    rng = np.random.default_rng(7)
    for setting_index, setting in enumerate(SETTINGS):
        for dataset, kind in THRESHOLDS.items():
            pairs, keypoints = [], []
            for index in range(30):
                pair_id, n_kps, ref = f"{dataset}-{index:03d}", int(rng.integers(1, 9)), float(rng.uniform(50, 200))
                errors = rng.exponential(10 + 10 * setting_index, n_kps)
                category = ("cat", "dog", "bus")[index % 3]
                pairs.append(pair_row(pair_id, category, setting, threshold_kind=kind, n_kps=n_kps, ref_length=ref))
                keypoints += [
                    {"pair_id": pair_id, "kp_index": k, "kps_id": k, "src_x": 0.0, "src_y": 0.0, "pred_x": 0.0,
                     "pred_y": 0.0, "trg_x": 0.0, "trg_y": 0.0, "error": float(e), "ref_length": ref,
                     "threshold_kind": kind}
                    for k, e in enumerate(errors)
                ]  # fmt: skip
            results.write_part(
                results.part_path(folder, "pairs", dataset, SETTINGS[setting][0], setting, 0),
                pairs,
                results.PAIRS_SCHEMA,
            )
            results.write_part(
                results.part_path(folder, "keypoints", dataset, SETTINGS[setting][0], setting, 0),
                keypoints,
                results.KEYPOINTS_SCHEMA,
            )
        flows = [
            pair_row(f"{subset}/{index}/{direction}", subset, setting, group=f"{subset}/{index}", direction=direction,
                     flow_accuracy=np.sort(rng.uniform(0, 1, 50)).tolist())
            for subset in ("FG3DCar", "JODS", "PASCAL")
            for index in range(4 + 2 * ("FG3DCar", "JODS", "PASCAL").index(subset))
            for direction in ("1to2", "2to1")
        ]  # fmt: skip
        results.write_part(
            results.part_path(folder, "pairs", "tss", SETTINGS[setting][0], setting, 0), flows, results.PAIRS_SCHEMA
        )
    return folder


def test_every_number_equals_a_pandas_computation_from_the_parquet_files(run_folder):
    run = load_run(run_folder)
    numbers = paper.paper_numbers(run.pairs, run.keypoints, KINDS).set_index(["averaging", "setting", "column"])
    keypoints = pd.read_parquet(run_folder / "keypoints")
    pairs = pd.read_parquet(run_folder / "pairs")
    headers = {
        ("spair", 0.1): "SPair-71k PCK@0.1 (bbox)",
        ("pfp", 0.05): "PF-PASCAL PCK@0.05 (img)",
        ("pfp", 0.1): "PF-PASCAL PCK@0.1 (img)",
        ("pfp", 0.15): "PF-PASCAL PCK@0.15 (img)",
        ("willow", 0.1): "PF-WILLOW PCK@0.1 (kps)",
    }
    for (dataset, alpha), header in headers.items():
        rows = keypoints[keypoints["dataset"] == dataset]
        correct = (rows["error"] <= alpha * rows["ref_length"]).groupby([rows["setting"], rows["pair_id"]])
        per_pair = correct.mean()
        for matcher in SETTINGS:
            per_image = per_pair[matcher].mean()
            per_keypoint = correct.sum()[matcher].sum() / correct.count()[matcher].sum()
            assert numbers.loc[("per_image", matcher, header), "value"] == pytest.approx(per_image, abs=1e-12)
            assert numbers.loc[("per_keypoint", matcher, header), "value"] == pytest.approx(per_keypoint, abs=1e-12)
            assert numbers.loc[("per_image", matcher, header), "n_pairs"] == 30
    flows = pairs[pairs["dataset"] == "tss"].assign(t5=lambda frame: frame["flow_accuracy"].map(lambda a: a[4]))
    subsets = flows.groupby(["setting", "category"])["t5"].mean().unstack()
    for matcher in SETTINGS:
        for subset in ("FG3DCar", "JODS", "PASCAL"):
            value = numbers.loc[("per_image", matcher, f"TSS {subset} T5"), "value"]
            assert value == pytest.approx(subsets.loc[matcher, subset], abs=1e-12)
        average = numbers.loc[("per_keypoint", matcher, "TSS avg T5"), "value"]
        assert average == pytest.approx(subsets.loc[matcher].mean(), abs=1e-12)
    assert list(dict.fromkeys(numbers.reset_index()["column"])) == [
        *headers.values(),
        "TSS FG3DCar T5",
        "TSS JODS T5",
        "TSS PASCAL T5",
        "TSS avg T5",
    ]
    for (_, _, _), row in numbers.iterrows():
        assert row["ci_low"] <= row["value"] <= row["ci_high"]


def test_the_bootstrap_interval_holds_the_estimate_narrows_with_more_pairs_and_pools_keypoints():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        values = rng.uniform(0, 1, n)
        low, high = paper.bootstrap_interval([(values, np.ones(n))])
        assert low <= values.mean() <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[1] == pytest.approx(2 * 1.96 * np.sqrt(1 / 12 / 200), rel=0.2)  # the normal approximation
    n_correct, n_kps = np.array([0, 5, 1]), np.array([1, 5, 10])
    low, high = paper.bootstrap_interval([(n_correct / n_kps, n_kps)])
    assert low <= n_correct.sum() / n_kps.sum() <= high
    assert paper.bootstrap_interval([(n_correct / n_kps, n_kps)]) == (low, high)  # a fixed seed


def test_tables_show_the_best_in_bold_and_the_csv_holds_the_numbers(run_folder, tmp_path):
    run = load_run(run_folder)
    section, found = paper.paper_section(tmp_path, run.pairs, run.keypoints, KINDS)
    numbers = found["paper"]
    table = paper.display_table(numbers, "per_image").set_index("setting")
    assert list(table.index) == ["gwot[eps=0.05] (daisy)", "nn (daisy)"]
    for column in table.columns:
        values = numbers[(numbers["column"] == column) & (numbers["averaging"] == "per_image")]
        best = values.loc[values["value"].idxmax(), "setting"]
        best_label = {"aaaaaaaaaaaa": "nn (daisy)", "bbbbbbbbbbbb": "gwot[eps=0.05] (daisy)"}[best]
        assert isinstance(table.loc[best_label, column], Strong)
        value = values["value"].max()
        assert str(table.loc[best_label, column]).startswith(f"{100 * value:.1f} [")
    html, markdown = render_html("r", [section]), render_markdown("r", [section])
    assert "<strong>" in html and "Paper table, PCK per image: mean over pairs" in markdown
    assert "avg = mean of the three subsets" in markdown and "**" in markdown

    csv = pd.read_csv(tmp_path / "paper-table.csv")
    assert len(csv) == len(numbers) and set(csv.columns) >= {"column", "value", "ci_low", "ci_high", "averaging"}
    np.testing.assert_allclose(csv["value"], numbers["value"])
    categories = pd.read_csv(tmp_path / "paper-spair-categories.csv")
    spair = paper.category_table(found["paper_spair_categories"], "spair", "per_keypoint")
    assert list(spair.columns) == ["setting", "bus", "cat", "dog", "mean"]
    cats = categories[(categories["averaging"] == "per_keypoint") & (categories["setting"] == "aaaaaaaaaaaa")]
    keypoints = pd.read_parquet(run_folder / "keypoints")
    rows = keypoints[(keypoints["dataset"] == "spair") & (keypoints["setting"] == "aaaaaaaaaaaa")]
    pairs = pd.read_parquet(run_folder / "pairs").query("dataset == 'spair' and setting == 'aaaaaaaaaaaa'")
    rows = rows.merge(pairs[["pair_id", "category"]], on="pair_id")
    expected = (rows["error"] <= 0.1 * rows["ref_length"]).groupby(rows["category"]).mean()
    np.testing.assert_allclose(cats.set_index("category")["value"].sort_index(), expected.sort_index())


def test_a_demo_report_holds_the_paper_table_and_its_csv(tmp_path):
    catalog = write_demo_catalog(tmp_path, n_pairs=3)
    result = CliRunner().invoke(cli, ["--catalog", str(catalog), "-q", "run"])
    assert result.exit_code == 0, result.output
    report = tmp_path / "outputs" / "default" / "report"
    markdown = (report / "report.md").read_text()
    assert "## Paper tables" in markdown and "| setting | demo PCK@0.1 (img) |" in markdown
    csv = pd.read_csv(report / "paper-table.csv")
    assert set(csv["matcher"]) == {"nn", "gwot"} and set(csv["column"]) == {"demo PCK@0.1 (img)"}
    pairs = pd.read_parquet(tmp_path / "outputs" / "default" / "pairs")
    alpha = json.loads((tmp_path / "outputs" / "default" / "config.json").read_text())["alphas"].index(0.1)
    expected = pairs.assign(p=pairs["pck"].map(lambda p: p[alpha])).groupby("matcher")["p"].mean()
    per_image = csv[csv["averaging"] == "per_image"].set_index("matcher")["value"]
    np.testing.assert_allclose(per_image.sort_index(), expected.sort_index())


def test_one_table_when_both_averagings_agree(run_folder, tmp_path):
    run = load_run(run_folder)
    equal = run.keypoints.groupby(["dataset", "setting", "pair_id"]).head(1)  # one keypoint per pair
    pairs = run.pairs.assign(n_kps=run.pairs["n_kps"].clip(upper=1))
    section, _ = paper.paper_section(tmp_path, pairs, equal, KINDS)
    captions = [block.caption for block in section.blocks if hasattr(block, "caption")]
    assert "Paper table, PCK per image = per keypoint (every pair has as many keypoints)" in captions
    assert not any(caption.startswith("Paper table, PCK per keypoint") for caption in captions)
