"""The result tables: parts round-trip through hive partitions, summaries average both ways, configs merge."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline import results

SETTING = {
    "matcher_name": "nn",
    "matcher_label": "nn",
    "method": "nn",
    "params_json": "{}",
    "backbone": "daisy",
    "backbone_key": "daisy-112-abc",
    "random_weights": False,
}


def pair_row(pair_id: str, n_kps: int, n_correct: list[int], **extra) -> dict:
    """A pair result at alphas (0.05, 0.1) with hand-set counts."""
    row = {
        "pair_id": pair_id,
        "split": "test",
        "category": "cat",
        "src_image_id": f"{pair_id}/src",
        "trg_image_id": f"{pair_id}/trg",
        **SETTING,
        "batch": 0,
        "n_kps": n_kps,
        "threshold_kind": "trg_bbox",
        "ref_length": 100.0 if n_kps else None,
        "alphas": [0.05, 0.1],
        "n_correct": n_correct,
        "pck": [c / n_kps if n_kps else np.nan for c in n_correct],
        "flip": False,
        "solve_seconds": 0.1,
    }
    return {**row, **extra}


def frame(rows: list[dict], dataset: str = "d", matcher: str = "k1") -> pd.DataFrame:
    table = pa.Table.from_pylist(rows, schema=results.PAIRS_SCHEMA).to_pandas()
    return table.assign(dataset=dataset, matcher=matcher)


def test_summary_reports_per_image_and_per_keypoint_pck_which_differ():
    pairs = frame(
        [
            pair_row("p1", 1, [0, 1]),
            pair_row("p2", 3, [1, 1]),
            pair_row("p3", 0, [0, 0]),  # no keypoints: in neither average
        ]
    )
    summary = results.summarize(pairs).set_index(["averaging", "threshold"])
    assert summary.loc[("per_image", 0.1), "value"] == pytest.approx((1 / 1 + 1 / 3) / 2)
    assert summary.loc[("per_keypoint", 0.1), "value"] == pytest.approx(2 / 4)
    assert summary.loc[("per_image", 0.05), "value"] == pytest.approx((0 + 1 / 3) / 2)
    assert summary.loc[("per_keypoint", 0.05), "value"] == pytest.approx(1 / 4)
    assert set(summary["n_pairs"]) == {2} and set(summary["n_keypoints"]) == {4}
    assert summary.loc[("per_image", 0.1), "protocol"] == (
        "PCK: correct if error <= alpha * max(w, h) of the target bbox, in original image pixels; "
        "mean over pairs of each pair's fraction correct"
    )
    table = results.summary_markdown(results.summarize(pairs))
    header, _, row = table.splitlines()[:3]
    assert "PCK@0.1 img | PCK@0.1 kp" in header
    assert row == "| d | all | nn | daisy | k1 | trg_bbox | 16.7 | 25.0 | 66.7 | 50.0 |"


def test_summary_averages_tss_directions_per_subset_with_and_without_flips():
    accuracy = np.linspace(0, 1, 50)
    rows = [
        pair_row(f"JODS/a/{d}", 0, [0, 0], category="JODS", group="JODS/a", direction=d, flow_accuracy=accuracy * s)
        for d, s in (("1to2", 1.0), ("2to1", 0.5))
    ]
    rows.append(
        pair_row("JODS/b/1to2", 0, [0, 0], category="JODS", group="JODS/b", direction="1to2", flip=True,
                 flow_accuracy=accuracy * 0.3)
    )  # fmt: skip
    rows.append(pair_row("PASCAL/c/1to2", 0, [0, 0], category="PASCAL", group="PASCAL/c", flow_accuracy=accuracy))
    pairs = frame(rows, dataset="tss")
    summary = results.summarize(pairs)
    t5 = summary[np.isclose(summary["threshold"], 0.05)].set_index(["subset", "averaging"])["value"]
    assert t5[("JODS", "all_directions")] == pytest.approx(accuracy[4] * (1.0 + 0.5 + 0.3) / 3)
    assert t5[("JODS", "without_flip")] == pytest.approx(accuracy[4] * (1.0 + 0.5) / 2)
    assert t5[("PASCAL", "all_directions")] == pytest.approx(accuracy[4])
    assert len(summary[summary["subset"] == "JODS"]) == 2 * 50  # T1..T50, both averagings
    assert "| tss | JODS | nn | daisy | k1 | trg_image | " in results.summary_markdown(summary)


def test_parts_round_trip_through_hive_partitions(tmp_path):
    run = results.run_dir(tmp_path, "r")
    rows = [pair_row("p1", 2, [1, 2]), pair_row("p2", 2, [0, 1])]
    results.write_part(results.part_path(run, "pairs", "demo", "0123456789ab", 0), rows[:1], results.PAIRS_SCHEMA)
    results.write_part(results.part_path(run, "pairs", "demo", "0123456789ab", 1), rows[1:], results.PAIRS_SCHEMA)
    results.write_part(results.part_path(run, "pairs", "demo", "123456789012", 0), rows, results.PAIRS_SCHEMA)
    assert (run / "pairs/dataset=demo/matcher=0123456789ab/part-00001.parquet").is_file()

    read = results.read_results(run).sort_values(["matcher", "pair_id"])
    assert read["matcher"].tolist() == ["0123456789ab", "0123456789ab", "123456789012", "123456789012"]
    assert read["dataset"].tolist() == ["demo"] * 4
    long = results.pck_long(read[read["matcher"] == "123456789012"])
    assert long[["pair_id", "alpha", "n_correct", "pck"]].values.tolist() == [
        ["p1", 0.05, 1, 0.5], ["p1", 0.1, 2, 1.0], ["p2", 0.05, 0, 0.0], ["p2", 0.1, 1, 0.5],
    ]  # fmt: skip

    plain = pd.read_parquet(run / "pairs")  # what the README shows; partitions become columns
    assert len(plain) == 4 and {"dataset", "matcher", "pck"} <= set(plain.columns)
    assert results.read_results(tmp_path / "empty").columns.tolist()[-2:] == ["dataset", "matcher"]


def test_summary_files_and_config_merging(tmp_path):
    run = results.run_dir(tmp_path, "r")
    results.write_part(results.part_path(run, "pairs", "d", "k1", 0), [pair_row("p1", 2, [1, 2])], results.PAIRS_SCHEMA)
    summary = results.write_summary(run)
    assert pd.read_parquet(run / "summary.parquet").equals(summary)
    assert set(summary["averaging"]) == {"per_image", "per_keypoint"}
    assert (run / "summary.md").read_text() == results.summary_markdown(summary)

    results.update_run_config(run, {"run": "r", "settings": {"k1": {"label": "nn"}}, "datasets": {"d": {"n": 1}}})
    merged = results.update_run_config(run, {"settings": {"k2": {"label": "gwot"}}, "datasets": {"e": {"n": 2}}})
    assert merged == {
        "run": "r",
        "settings": {"k1": {"label": "nn"}, "k2": {"label": "gwot"}},
        "datasets": {"d": {"n": 1}, "e": {"n": 2}},
    }
    assert results.read_run_config(run) == merged
