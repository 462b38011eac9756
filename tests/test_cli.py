"""The command line end to end: download and normalize over a real local HTTP server, status, errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli import cli

DEMO_CATALOG = """
stores: {data_root: data, cache_root: cache, outputs: outputs}
datasets:
  demo: {kind: demo, options: {n_pairs: 2, max_side: 96, n_keypoints: 8}}
"""


def write_catalog(folder: Path, text: str) -> Path:
    path = folder / "catalog.yaml"
    path.write_text(text)
    return path


def invoke(catalog: Path, *args: str):
    return CliRunner().invoke(cli, ["--catalog", str(catalog), "-q", *args], catch_exceptions=False)


def zip_folder(folder: Path, archive: Path, corrupt: str | None = None) -> bytes:
    """Zip ``folder`` (keeping its name as the top level); optionally garble the magic of file ``corrupt``."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder.parent).as_posix()
                data = path.read_bytes()
                zf.writestr(name, b"XXXX" + data[4:] if name == corrupt else data)
    return archive.read_bytes()


TSS_OFFLINE = """
stores: {data_root: data}
datasets:
  tss: {kind: tss, sources: [{url: "http://127.0.0.1:9/TSS_CVPR2016.zip", filename: TSS_CVPR2016.zip}]}
"""


@pytest.fixture
def tss_zip(tmp_path, shared_fixtures) -> bytes:
    return zip_folder(shared_fixtures / "tss" / "TSS_CVPR2016", tmp_path / "TSS_CVPR2016.zip")


def tss_catalog(folder: Path, url: str, data: bytes) -> Path:
    digest = hashlib.sha256(data).hexdigest()
    return write_catalog(
        folder,
        f"""
stores: {{data_root: data}}
datasets:
  tss:
    kind: tss
    sources: [{{url: "{url}", filename: TSS_CVPR2016.zip, size: {len(data)}, sha256: {digest}}}]
""",
    )


def test_demo_download_normalize_status_and_a_rerun_that_does_nothing(tmp_path):
    catalog = write_catalog(tmp_path, DEMO_CATALOG)
    result = invoke(catalog, "run", "--stage", "download", "--stage", "normalize", "--dataset", "demo")
    assert result.exit_code == 0, result.output
    tables = tmp_path / "data" / "normalized" / "demo"
    pairs = pd.read_parquet(tables / "pairs.parquet")
    images = pd.read_parquet(tables / "images.parquet")
    assert len(pairs) == 2 and len(images) == 4
    assert set(pairs.src_image_id) | set(pairs.trg_image_id) == set(images.image_id)
    assert all(len(kps) == 8 for kps in pairs.src_kps)
    assert all((tmp_path / "data" / "raw" / "demo" / p).is_file() for p in images.path)

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*") if p.is_file()}
    assert invoke(catalog, "run", "--stage", "download", "--stage", "normalize").exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*") if p.is_file()} == stamps

    status = invoke(catalog, "status").output.splitlines()
    assert any(line.split()[:3] == ["demo", "download", "done"] for line in status)
    assert any(line.split()[:4] == ["demo", "normalize", "done", "1/1"] for line in status)


def test_normalize_alone_generates_the_offline_demo(tmp_path):
    catalog = write_catalog(tmp_path, DEMO_CATALOG)
    assert invoke(catalog, "run", "--stage", "normalize", "--dataset", "demo").exit_code == 0
    assert len(pd.read_parquet(tmp_path / "data" / "normalized" / "demo" / "pairs.parquet")) == 2


def test_force_redoes_the_work(tmp_path):
    catalog = write_catalog(tmp_path, DEMO_CATALOG)
    assert invoke(catalog, "run", "--stage", "download", "--stage", "normalize").exit_code == 0
    table = tmp_path / "data" / "normalized" / "demo" / "pairs.parquet"
    before = table.stat().st_mtime_ns
    assert invoke(catalog, "run", "--stage", "normalize", "--force").exit_code == 0
    assert table.stat().st_mtime_ns != before


def test_tss_from_a_local_http_server_then_normalized(tmp_path, server, tss_zip):
    server.files["/TSS_CVPR2016.zip"] = tss_zip
    catalog = tss_catalog(tmp_path, server.url("/TSS_CVPR2016.zip"), tss_zip)
    assert invoke(catalog, "run", "--stage", "download", "--stage", "normalize", "--dataset", "tss").exit_code == 0
    pairs = pd.read_parquet(tmp_path / "data" / "normalized" / "tss" / "pairs.parquet")
    assert len(pairs) == 6 and set(pairs.direction) == {"1to2", "2to1"}
    assert set(pairs.category) == {"JODS", "PASCAL"}
    assert invoke(catalog, "run", "--dataset", "tss", "--stage", "download", "--stage", "normalize").exit_code == 0
    assert server.count("/TSS_CVPR2016.zip") == 1


def test_a_malformed_file_stops_normalize_unless_skip_bad(tmp_path, server, shared_fixtures):
    bad_flow = "TSS_CVPR2016/JODS/car_03_04/flow1.flo"
    data = zip_folder(shared_fixtures / "tss" / "TSS_CVPR2016", tmp_path / "TSS_CVPR2016.zip", corrupt=bad_flow)
    server.files["/TSS_CVPR2016.zip"] = data
    catalog = tss_catalog(tmp_path, server.url("/TSS_CVPR2016.zip"), data)
    assert invoke(catalog, "run", "--stage", "download").exit_code == 0
    result = CliRunner().invoke(cli, ["--catalog", str(catalog), "-q", "run", "--stage", "normalize"])
    assert result.exit_code == 1
    assert "car_03_04/flow1.flo" in result.output and "magic" in result.output
    assert not (tmp_path / "data" / "normalized" / "tss" / "pairs.parquet").exists()

    assert invoke(catalog, "run", "--stage", "normalize", "--skip-bad").exit_code == 0
    tables = tmp_path / "data" / "normalized" / "tss"
    bad = pd.read_parquet(tables / "bad_items.parquet")
    assert len(bad) == 1 and bad.path[0].endswith("car_03_04/flow1.flo")
    assert len(pd.read_parquet(tables / "pairs.parquet")) == 4


def test_offline_download_fails_fast_with_the_manual_fix_then_uses_the_hand_placed_archive(
    tmp_path, closed_port_url, tss_zip
):
    catalog = tss_catalog(tmp_path, closed_port_url.replace("file.zip", "TSS_CVPR2016.zip"), tss_zip)
    result = CliRunner().invoke(cli, ["--catalog", str(catalog), "-q", "run", "--stage", "download"])
    assert result.exit_code == 1
    assert "TSS_CVPR2016.zip" in result.output and "--archive" in result.output
    archive = tmp_path / "TSS_CVPR2016.zip"
    result = invoke(
        catalog, "run", "--stage", "download", "--stage", "normalize", "--dataset", "tss", "--archive", str(archive)
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "normalized" / "tss" / "pairs.parquet").is_file()


@pytest.mark.parametrize(
    ("catalog_text", "args", "message"),
    [
        (DEMO_CATALOG + "colour: blue\n", ("status",), "unknown top-level key(s) 'colour'"),
        (DEMO_CATALOG, ("run", "--dataset", "spair"), "unknown dataset 'spair'; the catalog defines: demo"),
        (TSS_OFFLINE, ("run", "--stage", "normalize"), "run `pipeline run --stage download --dataset tss`"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, catalog_text, args, message):
    result = CliRunner().invoke(cli, ["--catalog", str(write_catalog(tmp_path, catalog_text)), *args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_archive_needs_exactly_one_dataset(tmp_path, tss_zip):
    catalog = write_catalog(tmp_path, DEMO_CATALOG)
    result = CliRunner().invoke(
        cli, ["--catalog", str(catalog), "run", "--archive", str(tmp_path / "TSS_CVPR2016.zip")]
    )
    assert result.exit_code == 2 and "--archive needs exactly one --dataset" in result.output


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "pipeline"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "run" in result.stdout and "status" in result.stdout


def test_match_pair_on_two_photos_writes_pictures_and_points(tmp_path):
    import json

    from PIL import Image
    from skimage import data

    photo = data.astronaut()
    Image.fromarray(photo).save(tmp_path / "src.png")
    Image.fromarray(photo[40:440, 60:460]).resize((300, 300)).save(tmp_path / "trg.jpg")
    catalog = write_catalog(
        tmp_path,
        """
backbones: {daisy: {model: daisy, weights: none, image_size: 112}}
default_backbone: daisy
matchers: {nn: {method: nn}, gwot: {method: gwot, params: {outer_iters: 3, inner_iters: 30}}}
""",
    )
    out = tmp_path / "pictures"
    args = ["match-pair", str(tmp_path / "src.png"), str(tmp_path / "trg.jpg"), "--out", str(out)]
    result = invoke(catalog, *args, "--points", "200,150 300,300")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "src-trg.json").read_text())
    for name in ("nn", "gwot"):
        assert (out / f"src-trg-{name}.png").is_file()
        assert record["matchers"][name]["points"] == [[200.0, 150.0], [300.0, 300.0]]
        assert all(0 <= x < 300 and 0 <= y < 300 for x, y in record["matchers"][name]["predictions"])

    missing = CliRunner().invoke(cli, ["--catalog", str(catalog), "match-pair", str(tmp_path / "nope.png"), args[2]])
    assert missing.exit_code == 1 and "nope.png" in missing.output


@pytest.mark.parametrize(
    ("matchers", "args", "message"),
    [
        (
            "gwot: {method: gwot}",
            ["--set", "gwot.eps=0.05,-1"],
            "error: --set gwot.eps=0.05,-1: gwot.eps must be a finite number >= 0.0001",
        ),
        ("gwot: {method: gwot}", ["--set", "gwot.epz=1"], "error: --set gwot.epz=1: unknown key 'epz'"),
        ("gwot: {method: gwot}", ["--matcher", "nn"], "error: unknown matcher 'nn'; the catalog defines: gwot"),
        (
            "sharp: {method: nn, params: {temperature: -0.5}}",
            [],
            "catalog.yaml: matchers.sharp.params.temperature: must be a finite number > 0, got -0.5",
        ),
    ],
)
def test_bad_matcher_parameters_fail_before_any_stage_starts_naming_their_source(tmp_path, matchers, args, message):
    catalog = write_catalog(tmp_path, DEMO_CATALOG + f"matchers:\n  {matchers}\n")
    # A subprocess: it must fail without importing torch (which every stage that matches needs) ...
    code = "from pipeline.cli import main; main()"
    command = [sys.executable, "-X", "importtime", "-c", code, "--catalog", str(catalog), "run", "--stage", "match"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert " torch" not in result.stderr and "Traceback" not in result.stderr
    # ... and without touching a store: nothing is written next to the catalog.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.yaml"]


def test_a_run_of_the_older_layout_is_refused_in_one_line_by_status_report_and_export(tmp_path):
    catalog = write_catalog(tmp_path, DEMO_CATALOG + "matchers:\n  nn: {method: nn}\n")
    run = tmp_path / "outputs" / "old"
    old = run / "pairs" / "dataset=demo" / "matcher=0123456789ab" / "part-00000.parquet"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"PAR1")
    (run / "config.json").write_text('{"settings": {"0123456789ab": {"name": "nn", "label": "nn"}}}')
    expected = f"{old.parent}: results of an older layout (the setting's key as the matcher folder)"

    status = invoke(catalog, "status", "--run", "old")
    assert status.exit_code == 0
    rows = [line for line in status.output.splitlines() if line.split()[1:2] in (["match"], ["report"])]
    assert len(rows) == 2 and all(expected in row and "re-run the match stage" in row for row in rows)
    for command in (["report", "--run", "old"], ["export-tss", "--run", "old", "--matcher", "nn", "--out", "x"]):
        result = invoke(catalog, *command)
        assert result.exit_code == 1 and result.output.startswith(f"error: {expected}")
        assert len(result.output.splitlines()) == 1
