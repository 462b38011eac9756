"""The result tables: parts round-trip through hive partitions named for humans, the older layout is refused,
the summary is stored, configs merge."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline import results
from stages.evaluate.summary import pck_long, summarize, summary_markdown
from tests.result_rows import pair_row


def test_parts_round_trip_through_hive_partitions(tmp_path):
    run = results.run_dir(tmp_path, "r")
    rows = [pair_row("p1", 2, [1, 2]), pair_row("p2", 2, [0, 1])]
    sweep = "gwot[eps=0.02,k=3]"
    results.write_part(
        results.part_path(run, "pairs", "demo", sweep, "0123456789ab", 0), rows[:1], results.PAIRS_SCHEMA
    )
    results.write_part(
        results.part_path(run, "pairs", "demo", sweep, "0123456789ab", 1), rows[1:], results.PAIRS_SCHEMA
    )
    results.write_part(results.part_path(run, "pairs", "demo", "nn", "123456789012", 0), rows, results.PAIRS_SCHEMA)
    assert (run / f"pairs/dataset=demo/matcher={sweep}/setting=0123456789ab/part-00001.parquet").is_file()

    read = results.read_results(run).sort_values(["setting", "pair_id"])
    assert read["setting"].tolist() == ["0123456789ab", "0123456789ab", "123456789012", "123456789012"]
    assert read["matcher"].tolist() == [sweep, sweep, "nn", "nn"]
    assert read["dataset"].tolist() == ["demo"] * 4
    long = pck_long(read[read["matcher"] == "nn"])
    assert long[["pair_id", "alpha", "n_correct", "pck"]].values.tolist() == [
        ["p1", 0.05, 1, 0.5], ["p1", 0.1, 2, 1.0], ["p2", 0.05, 0, 0.0], ["p2", 0.1, 1, 0.5],
    ]  # fmt: skip

    plain = pd.read_parquet(run / "pairs")  # what the README shows; partitions become columns
    assert len(plain) == 4 and {"dataset", "matcher", "setting", "pck"} <= set(plain.columns)
    assert sorted(plain["matcher"].astype(str).unique()) == [sweep, "nn"]
    assert results.read_results(tmp_path / "empty").columns.tolist()[-3:] == ["dataset", "matcher", "setting"]


def test_settings_that_share_a_label_keep_apart_by_their_key(tmp_path):
    """A catalog matcher edited between two invocations of a run: one label, two keys, two folders."""
    run = results.run_dir(tmp_path, "r")
    for key, counts in (("aaaaaaaaaaaa", [0, 1]), ("bbbbbbbbbbbb", [1, 1])):
        path = results.part_path(run, "pairs", "d", "gwot", key, 0)
        results.write_part(path, [pair_row("p1", 1, counts)], results.PAIRS_SCHEMA)
    read = results.read_results(run).sort_values("setting")
    assert read["matcher"].tolist() == ["gwot", "gwot"] and read["setting"].tolist() == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]
    assert [list(counts) for counts in read["n_correct"]] == [[0, 1], [1, 1]]
    assert results.setting_labels(run, "d", "bbbbbbbbbbbb") == ["gwot"] and not results.setting_labels(run, "d", "c")


def test_a_label_with_a_slash_is_escaped_in_its_folder_and_read_back(tmp_path):
    run = results.run_dir(tmp_path, "r")
    results.write_part(results.part_path(run, "pairs", "d", "a/b%", "k1", 0), [pair_row("p1", 1, [0, 1])],
                       results.PAIRS_SCHEMA)  # fmt: skip
    assert results.read_results(run)["matcher"].tolist() == ["a/b%"]
    assert pd.read_parquet(run / "pairs")["matcher"].astype(str).tolist() == ["a/b%"]


def test_results_of_the_older_layout_are_refused_in_one_line(tmp_path):
    run = results.run_dir(tmp_path, "old")
    old = run / "pairs/dataset=demo/matcher=0123456789ab/part-00000.parquet"
    results.write_part(old, [pair_row("p1", 1, [0, 1])], results.PAIRS_SCHEMA)
    with pytest.raises(results.OldLayoutError, match=r"older layout .* re-run the match stage") as error:
        results.read_results(run)
    assert "\n" not in str(error.value) and str(old.parent) in str(error.value)


def test_summary_files_and_config_merging(tmp_path):
    run = results.run_dir(tmp_path, "r")
    path = results.part_path(run, "pairs", "d", "nn", "k1", 0)
    results.write_part(path, [pair_row("p1", 2, [1, 2])], results.PAIRS_SCHEMA)
    summary = summarize(results.read_results(run))
    results.write_summary(run, summary, summary_markdown(summary))
    assert pd.read_parquet(run / "summary.parquet").equals(summary)
    assert set(summary["averaging"]) == {"per_image", "per_keypoint"}
    assert (run / "summary.md").read_text() == summary_markdown(summary)

    results.update_run_config(run, {"run": "r", "settings": {"k1": {"label": "nn"}}, "datasets": {"d": {"n": 1}}})
    merged = results.update_run_config(run, {"settings": {"k2": {"label": "gwot"}}, "datasets": {"e": {"n": 2}}})
    assert merged == {
        "run": "r",
        "settings": {"k1": {"label": "nn"}, "k2": {"label": "gwot"}},
        "datasets": {"d": {"n": 1}, "e": {"n": 2}},
    }
    assert results.read_run_config(run) == merged
