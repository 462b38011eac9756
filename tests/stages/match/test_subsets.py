"""Quick subsets: --category and --max-pairs select a fixed sample, recorded in config.json, never mixed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import CatalogError
from stages.match.subsets import Subset, select_pairs
from tests.catalogs import write_demo_catalog

ROWS = [{"pair_id": f"{i:03d}-{c}", "category": c} for c in ("cat", "dog", "bus") for i in range(10)]


def ids(rows):
    return [row["pair_id"] for row in rows]


def test_a_sample_is_fixed_spread_over_categories_and_keeps_the_rows_order():
    rows = sorted(ROWS, key=lambda row: row["pair_id"])
    sample = select_pairs(rows, Subset(max_pairs=9), "toy")
    assert len(sample) == 9 and ids(sample) == sorted(ids(sample))
    assert len({row["category"] for row in sample}) >= 2  # not the first 9 ids, which are all of one kind
    shuffled = random.Random(0).sample(rows, len(rows))
    assert sorted(ids(select_pairs(shuffled, Subset(max_pairs=9), "toy"))) == ids(sample)
    assert select_pairs(rows, Subset(max_pairs=100), "toy") == rows
    assert select_pairs(rows, Subset(), "toy") == rows


def test_categories_filter_and_combine_with_a_sample():
    dogs = select_pairs(ROWS, Subset(categories=("dog",)), "toy")
    assert {row["category"] for row in dogs} == {"dog"} and len(dogs) == 10
    some = select_pairs(ROWS, Subset(categories=("dog", "bus"), max_pairs=4), "toy")
    assert len(some) == 4 and {row["category"] for row in some} <= {"dog", "bus"}
    with pytest.raises(CatalogError, match=r"--category cow: dataset 'toy' has no such category; its categories: bus"):
        select_pairs(ROWS, Subset(categories=("cow", "dog")), "toy")


def run_cli(catalog: Path, *args: str):
    return CliRunner().invoke(cli, ["--catalog", str(catalog), "-q", *args])


def test_a_quick_run_matches_its_sample_records_it_and_is_never_mixed_with_another(tmp_path):
    catalog = write_demo_catalog(tmp_path, n_pairs=6, matchers={"nn": {"method": "nn"}})
    prepared = run_cli(catalog, "run", "--stage", "download", "--stage", "normalize", "--stage", "features")
    assert prepared.exit_code == 0, prepared.output
    quick = run_cli(catalog, "run", "--stage", "match", "--max-pairs", "2", "--run", "quick")
    assert quick.exit_code == 0, quick.output

    all_pairs = pd.read_parquet(tmp_path / "data" / "normalized" / "demo" / "pairs.parquet")
    expected = select_pairs(all_pairs.sort_values("pair_id").to_dict("records"), Subset(max_pairs=2), "demo")
    run = tmp_path / "outputs" / "quick"
    matched = pd.read_parquet(run / "pairs")
    assert sorted(matched["pair_id"]) == ids(expected)
    recorded = json.loads((run / "config.json").read_text())["datasets"]["demo"]
    assert recorded["subset"] == {"categories": [], "max_pairs": 2} and recorded["n_pairs"] == 2

    status = run_cli(catalog, "status", "--run", "quick")
    assert "demo           match      done" in status.output and "of at most 2 pairs" in status.output

    mixed = run_cli(catalog, "run", "--stage", "match", "--category", "rocket", "--run", "quick")
    assert mixed.exit_code == 1
    assert "run 'quick' holds demo results of at most 2 pairs, this command asks for categories rocket" in mixed.output
    assert sorted(pd.read_parquet(run / "pairs")["pair_id"]) == ids(expected)  # nothing lost

    rockets = run_cli(catalog, "run", "--stage", "match", "--category", "rocket", "--run", "rockets")
    assert rockets.exit_code == 0, rockets.output
    matched = pd.read_parquet(tmp_path / "outputs" / "rockets" / "pairs")
    assert set(matched["category"]) == {"rocket"} and len(matched) == (all_pairs["category"] == "rocket").sum()

    bad = run_cli(catalog, "run", "--stage", "match", "--max-pairs", "0")
    assert bad.exit_code == 2 and "0 is not in the range x>=1" in bad.output
