"""The one aggregation of scores over pairs: PCK per image and per keypoint, TSS flow accuracy, the Markdown table."""

from __future__ import annotations

import numpy as np
import pytest

from stages.evaluate.summary import pck_long, pck_table, summarize, summary_markdown
from tests.result_rows import pair_row, pairs_frame


def test_summary_reports_per_image_and_per_keypoint_pck_which_differ():
    pairs = pairs_frame(
        [
            pair_row("p1", 1, [0, 1]),
            pair_row("p2", 3, [1, 1]),
            pair_row("p3", 0, [0, 0]),  # no keypoints: in neither average
        ]
    )
    summary = summarize(pairs).set_index(["averaging", "threshold"])
    assert summary.loc[("per_image", 0.1), "value"] == pytest.approx((1 / 1 + 1 / 3) / 2)
    assert summary.loc[("per_keypoint", 0.1), "value"] == pytest.approx(2 / 4)
    assert summary.loc[("per_image", 0.05), "value"] == pytest.approx((0 + 1 / 3) / 2)
    assert summary.loc[("per_keypoint", 0.05), "value"] == pytest.approx(1 / 4)
    assert set(summary["n_pairs"]) == {2} and set(summary["n_keypoints"]) == {4}
    assert summary.loc[("per_image", 0.1), "protocol"] == (
        "PCK: correct if error <= alpha * max(w, h) of the target bbox, in original image pixels; "
        "mean over pairs of each pair's fraction correct"
    )
    table = summary_markdown(summarize(pairs))
    header, _, row = table.splitlines()[:3]
    assert header.startswith("| dataset | subset | matcher | backbone | setting | threshold |")
    assert "PCK@0.1 img | PCK@0.1 kp" in header
    assert row == "| d | all | nn | daisy | k1 | trg_bbox | 16.7 | 25.0 | 66.7 | 50.0 |"


def test_pck_table_averages_per_pair_and_pools_keypoints_at_each_alpha():
    # pair A: 1 of 1 correct; pair B: 1 of 4 correct; pair C: no keypoints (left out of both)
    pairs = pairs_frame([pair_row("A", 1, [0, 1]), pair_row("B", 4, [2, 4]), pair_row("C", 0, [0, 0])])
    table = pck_table(pck_long(pairs), ["setting"]).set_index("alpha")
    assert table.loc[0.05, "per_image"] == pytest.approx((0 + 0.5) / 2)
    assert table.loc[0.1, "per_image"] == pytest.approx((1 + 1) / 2)
    assert table.loc[0.05, "per_keypoint"] == pytest.approx(2 / 5)
    assert table.loc[0.1, "per_keypoint"] == pytest.approx(5 / 5)
    assert table["n_pairs"].tolist() == [2, 2] and table["n_keypoints"].tolist() == [5, 5]


def test_pck_table_of_pairs_without_keypoints_is_empty():
    assert pck_table(pck_long(pairs_frame([pair_row("C", 0, [0, 0])])), ["setting"]).empty
    assert summarize(pairs_frame([pair_row("C", 0, [0, 0])])).empty


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
    summary = summarize(pairs_frame(rows, dataset="tss"))
    t5 = summary[np.isclose(summary["threshold"], 0.05)].set_index(["subset", "averaging"])["value"]
    assert t5[("JODS", "all_directions")] == pytest.approx(accuracy[4] * (1.0 + 0.5 + 0.3) / 3)
    assert t5[("JODS", "without_flip")] == pytest.approx(accuracy[4] * (1.0 + 0.5) / 2)
    assert t5[("PASCAL", "all_directions")] == pytest.approx(accuracy[4])
    assert len(summary[summary["subset"] == "JODS"]) == 2 * 50  # T1..T50, both averagings
    assert "| tss | JODS | nn | daisy | k1 | trg_image | " in summary_markdown(summary)
