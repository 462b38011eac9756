"""Report fixes: a per-pair NN-against-GWOT scatter, histogram titles naming the settings drawn, and an
up-to-date report that is not rebuilt."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import results
from pipeline.cli import cli
from stages.evaluate.summary import pck_long
from stages.report import plots, tables
from tests.catalogs import write_demo_catalog
from tests.result_rows import pair_row


def invoke(catalog: Path, *args: str) -> None:
    result = CliRunner().invoke(cli, ["--catalog", str(catalog), "-q", *args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A demo run matched with nn and gwot, its report built: the catalog."""
    catalog = write_demo_catalog(tmp_path_factory.mktemp("fixes"), n_pairs=3)
    invoke(catalog, "run")
    return catalog


def test_the_report_has_a_scatter_of_each_pair_nn_against_gwot(demo):
    report = demo.parent / "outputs" / "default" / "report"
    markdown = (report / "report.md").read_text()
    assert "## Per pair: NN against GWOT (PCK@0.1)" in markdown
    (scatter,) = report.glob("scatter-demo-*.png")
    assert scatter.name in markdown and "above the diagonal, gwot is better" in markdown
    with Image.open(scatter) as picture:
        assert picture.size == plots.PIXELS


def test_an_up_to_date_report_is_not_rebuilt_a_stale_or_forced_one_is(demo, monkeypatch):
    index = demo.parent / "outputs" / "default" / "report" / "index.html"
    built = index.stat().st_mtime_ns
    invoke(demo, "run", "--stage", "report")
    assert index.stat().st_mtime_ns == built
    invoke(demo, "run", "--stage", "report", "--force")
    forced = index.stat().st_mtime_ns
    assert forced > built

    titles = []
    original = plots.plot_error_histograms
    monkeypatch.setattr(
        plots, "plot_error_histograms", lambda errors, **kw: titles.append(kw["title"]) or original(errors, **kw)
    )
    invoke(demo, "run", "--stage", "match", "--stage", "report", "--matcher", "gwot", "--set", "gwot.eps=0.05")
    assert index.stat().st_mtime_ns > forced  # new results: rebuilt
    assert titles == ["demo: per-pair error, gwot against nn"]  # the reference settings actually drawn


def sweep_pairs(settings: dict[str, tuple[str, str, float]]) -> pd.DataFrame:
    """Two pairs per setting key: (label, params_json, PCK@0.1 of both pairs), matcher gwot, method gwot."""
    rows = [
        {"dataset": "demo", "backbone_key": "daisy-112-0", "method": "gwot", "setting": key, "matcher": label,
         "matcher_name": "gwot", "params_json": params, "n_kps": 4, "alphas": [0.05, 0.1], "pck": [0.0, pck],
         "flow_accuracy": None}
        for key, (label, params, pck) in settings.items()
        for _ in range(2)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_the_reference_setting_is_the_catalog_default_else_the_best_not_the_first_by_label():
    sweep = {
        "k1": ("gwot[eps=0.01]", '{"eps": 0.01}', 0.4),
        "k2": ("gwot[eps=0.02]", '{"eps": 0.02}', 0.5),
        "k3": ("gwot[eps=0.05]", '{"eps": 0.05}', 0.7),
    }
    pairs = sweep_pairs(sweep)
    assert tables.reference_settings(pairs) == {("demo", "daisy-112-0", "gwot"): "k3"}  # the best
    defaults = {"gwot": '{"eps": 0.02}'}  # the catalog's gwot is eps=0.02: the sweep's default setting
    assert tables.reference_settings(pairs, defaults) == {("demo", "daisy-112-0", "gwot"): "k2"}
    plain = sweep_pairs({**sweep, "k4": ("gwot", '{"eps": 0.03}', 0.1)})
    assert tables.reference_settings(plain)[("demo", "daisy-112-0", "gwot")] == "k4"  # labelled as its matcher


def test_a_two_parameter_sweep_is_one_heatmap(demo):
    invoke(demo, "run", "--stage", "match", "--stage", "report", "--matcher", "gwot", "--set", "gwot.eps=0.02,0.05",
           "--set", "gwot.k=3,5", "--run", "grid")  # fmt: skip
    report = demo.parent / "outputs" / "grid" / "report"
    sweeps = sorted(path.name for path in report.glob("sweep-*.png"))
    assert (
        len(sweeps) == 1 and sweeps[0].startswith("sweep-demo-daisy-112-") and sweeps[0].endswith("-gwot-heatmap.png")
    )
    assert "PCK@0.1 per image (%) of every eps x k setting of gwot" in (report / "report.md").read_text()
    with Image.open(report / sweeps[0]) as picture:
        assert picture.size == plots.PIXELS


def test_settings_sharing_a_label_are_told_apart_by_their_key(tmp_path):
    """Two keys under one label (the catalog's gwot edited between invocations) are two rows, never merged."""
    for key, counts in (("aaaaaaaaaaaa", [0, 1]), ("bbbbbbbbbbbb", [1, 1])):
        for table, rows in (("pairs", [pair_row("p1", 1, counts)]), ("keypoints", [])):
            schema = results.TABLES[table]
            results.write_part(results.part_path(tmp_path, table, "d", "gwot", key, 0), rows, schema)
    results.write_part(results.part_path(tmp_path, "pairs", "d", "nn", "cccccccccccc", 0), [pair_row("p1", 1, [0, 0])],
                       results.PAIRS_SCHEMA)  # fmt: skip
    run = tables.load_run(tmp_path)
    assert sorted(run.pairs["matcher"]) == ["gwot (aaaaaaaaaaaa)", "gwot (bbbbbbbbbbbb)", "nn"]
    headline = tables.pck_table(pck_long(run.pairs)).query("alpha == 0.1").set_index("matcher")["per_image"]
    assert headline.to_dict() == {"gwot (aaaaaaaaaaaa)": 1.0, "gwot (bbbbbbbbbbbb)": 1.0, "nn": 0.0}
