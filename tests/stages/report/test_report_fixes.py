"""Report fixes: a per-pair NN-against-GWOT scatter, histogram titles naming the settings drawn, and an
up-to-date report that is not rebuilt."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from stages.report import plots


def invoke(catalog: Path, *args: str) -> None:
    result = CliRunner().invoke(cli, ["--catalog", str(catalog), "-q", *args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A demo run matched with nn and gwot, its report built: the catalog."""
    folder = tmp_path_factory.mktemp("fixes")
    catalog = folder / "catalog.yaml"
    body = {
        "datasets": {"demo": {"kind": "demo", "options": {"n_pairs": 3, "max_side": 96, "n_keypoints": 6}}},
        "backbones": {"daisy": {"model": "daisy", "weights": "none", "image_size": 112}},
        "default_backbone": "daisy",
        "matchers": {"nn": {"method": "nn"}, "gwot": {"method": "gwot", "params": {"outer_iters": 3}}},
        "cluster": {"n_workers": 1, "processes": False},
    }
    catalog.write_text(yaml.safe_dump(body))
    invoke(catalog, "run")
    return catalog


def test_the_report_has_a_scatter_of_each_pair_nn_against_gwot(demo):
    report = demo.parent / "outputs" / "default" / "report"
    markdown = (report / "report.md").read_text()
    assert "## Per pair: NN against GWOT (PCK@0.1)" in markdown
    (scatter,) = report.glob("pair-scatter-demo-*.png")
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
