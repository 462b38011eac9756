"""``pipeline list``: datasets, backbones, matchers with their parameters and defaults, and the runs."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from pipeline import results
from pipeline.cli import cli

CATALOG = """
stores: {data_root: data, cache_root: cache, outputs: outputs}
datasets:
  demo: {kind: demo, options: {n_pairs: 2, seed: 3}}
  willow: {kind: pf-willow, sources: [{url: "http://127.0.0.1:9/PF-dataset.zip", filename: PF-dataset.zip}]}
default_backbone: vitb
backbones:
  vitb: {model: vit_base_patch14_dinov2.lvd142m}
  deit: {model: deit_small_patch16_224.fb_in1k, image_size: 224, pos_embed: timm}
matchers:
  nn: {method: nn}
  sharp: {method: gwot, params: {eps: 0.01}}
  broken: {method: gwot, params: {eps: -1.0}}
"""


def list_output(tmp_path: Path, *sections: str) -> list[str]:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    result = CliRunner().invoke(cli, ["--catalog", str(catalog), "list", *sections], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def line_of(lines: list[str], start: str) -> str:
    (line,) = [line for line in lines if line.split()[:1] == [start]]
    return line


def test_list_shows_every_section_with_settings_defaults_and_runs(tmp_path):
    run = tmp_path / "outputs" / "sweep"
    for dataset, label, key in (("demo", "nn", "1a2b"), ("demo", "gwot", "3c4d"), ("willow", "nn", "1a2b")):
        part = results.part_path(run, "pairs", dataset, label, key, 0)
        part.parent.mkdir(parents=True)
        part.write_bytes(b"")
    (run / "config.json").write_text("{}")
    (tmp_path / "outputs" / "not-a-run").mkdir()
    lines = list_output(tmp_path)
    assert [line for line in lines if line and not line.startswith(" ")] == [
        "datasets (2):",
        "backbones (2; * default):",
        "matchers (3):",
        f"runs in {tmp_path / 'outputs'} (1):",
    ]
    assert line_of(lines, "demo").split()[1:4] == ["demo", "splits=test", "options:"]
    assert "n_pairs=2 seed=3" in line_of(lines, "demo") and "files: PF-dataset.zip" in line_of(lines, "willow")
    assert "vit_base_patch14_dinov2.lvd142m  weights=hub image_size=840" in line_of(lines, "vitb*")
    assert "image_size=224 layer=prenorm pos_embed=timm" in line_of(lines, "deit")
    assert line_of(lines, "nn").split()[1:] == ["nn", "window=3", "temperature=0.02"]
    sharp = line_of(lines, "sharp")
    assert "eps=0.01 (default 0.02) w_s=0.1 k=5" in sharp and "(default" not in sharp.split("w_s")[1]
    assert "INVALID: " in line_of(lines, "broken") and "eps" in line_of(lines, "broken")
    assert line_of(lines, "sweep").split()[1:] == [
        "datasets:",
        "demo,",
        "willow",
        "2",
        "setting(s);",
        "no",
        "summary",
        "yet",
    ]


def test_list_shows_only_the_sections_asked_for(tmp_path):
    lines = list_output(tmp_path, "backbones", "runs")
    assert lines[0] == "backbones (2; * default):" and lines[-1] == f"runs in {tmp_path / 'outputs'} (0):"
    assert not any(line.startswith(("datasets", "matchers")) for line in lines)


def test_a_run_of_the_older_layout_is_listed_as_such(tmp_path):
    old = tmp_path / "outputs" / "old" / "pairs" / "dataset=demo" / "matcher=0123456789ab" / "part-00000.parquet"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"")
    (tmp_path / "outputs" / "old" / "config.json").write_text("{}")
    assert "results of an older layout: re-run its match stage into a new run" in line_of(list_output(tmp_path), "old")
