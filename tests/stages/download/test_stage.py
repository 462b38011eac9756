"""Tests of the download stage over a catalog in a temporary folder and a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline import registry
from pipeline.cache import Ledger
from pipeline.catalog import load_catalog
from pipeline.context import RunOptions, StageContext
from pipeline.errors import ChecksumError, DownloadError, StageError, UnsafeArchiveError
from stages.download.stage import run, status

ZIP_NAME, CSV_NAME = "TSS_CVPR2016.zip", "test_pairs.csv"
TSS_FILES = {
    "TSS_CVPR2016/FG3DCar/pair1/image1.png": b"image one",
    "TSS_CVPR2016/JODS/pair2/flow1.flo": b"flow",
    "__MACOSX/TSS_CVPR2016/._image1.png": b"junk",
}
CSV = b"source_image,target_image\na.jpg,b.jpg\n"
QUIET = RunOptions(progress=False)


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


ZIP = _zip(TSS_FILES)


def _source(url: str, data: bytes, filename: str, **extra: object) -> dict[str, object]:
    return {
        "url": url,
        "filename": filename,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        **extra,
    }


def _context(tmp_path: Path, datasets: dict[str, dict], options: RunOptions = QUIET) -> StageContext:
    catalog = {"stores": {"data_root": "data"}, "datasets": datasets}
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    return StageContext(load_catalog(tmp_path / "catalog.yaml", environ={}), tuple(datasets), options)


def _tss(zip_url: str, csv_url: str) -> dict[str, dict]:
    sources = [_source(zip_url, ZIP, ZIP_NAME), _source(csv_url, CSV, CSV_NAME, extract=False)]
    return {"tss": {"kind": "tss", "sources": sources}}


@pytest.fixture
def served(server):
    server.files[f"/{ZIP_NAME}"] = ZIP
    server.files[f"/{CSV_NAME}"] = CSV
    return server


def _with(ctx: StageContext, **options: object) -> StageContext:
    return StageContext(ctx.catalog, ctx.datasets, RunOptions(progress=False, **options))


def test_run_fetches_extracts_and_records_every_unit(served, tmp_path):
    ctx = _context(tmp_path, _tss(served.url(f"/{ZIP_NAME}"), served.url(f"/{CSV_NAME}")))
    raw = tmp_path / "data" / "raw" / "tss"
    assert ctx.catalog.raw_dir("tss") == raw
    before = status(ctx, "tss")
    assert (before.done, before.total, before.complete) == (0, 4, False)
    assert before.detail == f"missing: fetch:{ZIP_NAME}, extract:{ZIP_NAME}, fetch:{CSV_NAME}, place:{CSV_NAME}"

    run(ctx)

    assert sorted(os.listdir(raw)) == [".done", "TSS_CVPR2016", "downloads", CSV_NAME]
    assert sorted(os.listdir(raw / "downloads")) == [ZIP_NAME, CSV_NAME]
    assert (raw / "TSS_CVPR2016/FG3DCar/pair1/image1.png").read_bytes() == b"image one"
    assert (raw / "TSS_CVPR2016/JODS/pair2/flow1.flo").read_bytes() == b"flow"
    assert (raw / CSV_NAME).read_bytes() == CSV
    ledger = Ledger(raw / ".done")
    assert ledger.done_units() == sorted(
        [f"fetch:{ZIP_NAME}", f"extract:{ZIP_NAME}", f"fetch:{CSV_NAME}", f"place:{CSV_NAME}"]
    )
    record = ledger.record(f"extract:{ZIP_NAME}")
    assert record["size"] == len(ZIP) and record["sha256"] == hashlib.sha256(ZIP).hexdigest()
    assert record["entries"] == ["TSS_CVPR2016"]
    assert ledger.record(f"fetch:{CSV_NAME}")["origin"] == "fetched"
    after = status(ctx, "tss")
    assert (after.done, after.total, after.complete, after.detail) == (4, 4, True, "")


def test_second_run_fetches_nothing_and_force_refetches(served, tmp_path):
    ctx = _context(tmp_path, _tss(served.url(f"/{ZIP_NAME}"), served.url(f"/{CSV_NAME}")))
    run(ctx)
    assert len(served.requests) == 2
    run(ctx)
    assert len(served.requests) == 2
    run(_with(ctx, force=True))
    assert served.count(f"/{ZIP_NAME}") == 2 and served.count(f"/{CSV_NAME}") == 2
    assert (tmp_path / "data/raw/tss/TSS_CVPR2016/JODS/pair2/flow1.flo").read_bytes() == b"flow"


def test_run_killed_before_extraction_resumes_without_refetching(served, tmp_path):
    ctx = _context(tmp_path, _tss(served.url(f"/{ZIP_NAME}"), served.url(f"/{CSV_NAME}")))
    run(ctx)
    raw = ctx.catalog.raw_dir("tss")
    Ledger(raw / ".done").clear(f"extract:{ZIP_NAME}")
    (raw / "TSS_CVPR2016/JODS/pair2/flow1.flo").unlink()
    assert status(ctx, "tss").done == 3
    run(ctx)
    assert len(served.requests) == 2
    assert (raw / "TSS_CVPR2016/JODS/pair2/flow1.flo").read_bytes() == b"flow"
    assert status(ctx, "tss").complete


def test_archive_option_is_verified_and_used_without_network(tmp_path, closed_port_url):
    ctx = _context(tmp_path, _tss(closed_port_url, closed_port_url))
    by_hand = tmp_path / "by_hand"
    by_hand.mkdir()
    (by_hand / ZIP_NAME).write_bytes(ZIP)
    (by_hand / CSV_NAME).write_bytes(CSV)
    run(_with(ctx, archives={"tss": (by_hand / ZIP_NAME, by_hand / CSV_NAME)}))
    raw = ctx.catalog.raw_dir("tss")
    assert (raw / "downloads" / ZIP_NAME).read_bytes() == ZIP
    assert (raw / "TSS_CVPR2016/FG3DCar/pair1/image1.png").read_bytes() == b"image one"
    assert (raw / CSV_NAME).read_bytes() == CSV
    assert Ledger(raw / ".done").record(f"fetch:{ZIP_NAME}")["origin"] == str(by_hand / ZIP_NAME)
    assert status(ctx, "tss").complete


def test_file_placed_in_the_downloads_folder_is_used_without_network(tmp_path, closed_port_url):
    ctx = _context(tmp_path, {"tss": {"kind": "tss", "sources": [_source(closed_port_url, ZIP, ZIP_NAME)]}})
    downloads = ctx.catalog.raw_dir("tss") / "downloads"
    downloads.mkdir(parents=True)
    (downloads / ZIP_NAME).write_bytes(ZIP)
    run(ctx)
    assert (downloads.parent / "TSS_CVPR2016/JODS/pair2/flow1.flo").read_bytes() == b"flow"
    assert Ledger(downloads.parent / ".done").record(f"fetch:{ZIP_NAME}")["origin"] == "hand-placed"


def test_archive_option_with_an_unknown_name_lists_the_expected_ones(tmp_path, closed_port_url):
    ctx = _context(tmp_path, _tss(closed_port_url, closed_port_url))
    stray = tmp_path / "TSS.zip"
    stray.write_bytes(ZIP)
    with pytest.raises(
        DownloadError,
        match=rf"'TSS.zip' matches no source of dataset 'tss'; expected one of: "
        rf"{ZIP_NAME}, {CSV_NAME}",
    ):
        run(_with(ctx, archives={"tss": (stray,)}))


def test_bad_hand_placed_archive_is_refused_and_nothing_recorded(tmp_path, closed_port_url):
    ctx = _context(tmp_path, _tss(closed_port_url, closed_port_url))
    bad = tmp_path / ZIP_NAME
    bad.write_bytes(_zip({"TSS_CVPR2016/other.png": b"not the release"}))
    with pytest.raises(ChecksumError, match=rf"{bad}: .*mismatch for {ZIP_NAME}.*; replace {bad} with a good copy"):
        run(_with(ctx, archives={"tss": (bad,)}))
    raw = ctx.catalog.raw_dir("tss")
    assert Ledger(raw / ".done").done_units() == []
    assert not (raw / "downloads" / ZIP_NAME).exists()


def test_checksum_mismatch_from_the_server_keeps_and_records_nothing(served, tmp_path):
    served.files[f"/{ZIP_NAME}"] = ZIP + b"tampered"
    ctx = _context(tmp_path, _tss(served.url(f"/{ZIP_NAME}"), served.url(f"/{CSV_NAME}")))
    with pytest.raises(ChecksumError, match=rf"size mismatch for {ZIP_NAME}: expected {len(ZIP)} bytes"):
        run(ctx)
    raw = ctx.catalog.raw_dir("tss")
    assert os.listdir(raw / "downloads") == []
    assert Ledger(raw / ".done").done_units() == []


def test_offline_without_a_file_says_where_to_put_one(tmp_path, closed_port_url):
    ctx = _context(tmp_path, _tss(closed_port_url, closed_port_url))
    expected = ctx.catalog.raw_dir("tss") / "downloads" / ZIP_NAME
    with pytest.raises(
        DownloadError,
        match=rf"(?s){closed_port_url}: cannot connect.*copy it to {expected} or pass "
        r"`--archive PATH",
    ):
        run(ctx)


def test_unsafe_archive_leaves_nothing_extracted(server, tmp_path):
    evil = _zip({"TSS_CVPR2016/ok.png": b"fine", "../escaped.txt": b"evil"})
    server.files[f"/{ZIP_NAME}"] = evil
    ctx = _context(tmp_path, {"tss": {"kind": "tss", "sources": [_source(server.url(f"/{ZIP_NAME}"), evil, ZIP_NAME)]}})
    with pytest.raises(UnsafeArchiveError, match=rf"{ZIP_NAME}: refusing entry '\.\./escaped\.txt'"):
        run(ctx)
    raw = ctx.catalog.raw_dir("tss")
    assert sorted(os.listdir(raw)) == [".done", "downloads"]
    assert Ledger(raw / ".done").done_units() == []  # a refused archive is not left marked fetched
    assert not (raw.parent / "escaped.txt").exists()
    with pytest.raises(UnsafeArchiveError, match=r"refusing entry '\.\./escaped\.txt'"):
        run(ctx)  # the kept file is checked again, and refused again
    assert server.count(f"/{ZIP_NAME}") == 1


def _fake_kind(monkeypatch) -> list[dict]:
    """Replace the demo kind's registered source by one whose ``materialize`` writes one file and logs its calls."""
    calls: list[dict] = []

    def materialize(raw_dir: Path, spec) -> None:
        calls.append(dict(spec.options))
        (raw_dir / "images").mkdir()
        (raw_dir / "images" / "a.png").write_bytes(b"generated")
        if spec.options.get("fail"):
            raise RuntimeError("generator failed")

    monkeypatch.setattr(registry, "source_module", lambda kind: SimpleNamespace(materialize=materialize))
    return calls


def test_dataset_without_sources_is_materialised_once(tmp_path, monkeypatch):
    calls = _fake_kind(monkeypatch)
    ctx = _context(tmp_path, {"demo": {"kind": "demo", "options": {"n_pairs": 3}}})
    assert (status(ctx, "demo").done, status(ctx, "demo").total) == (0, 1)
    run(ctx)
    raw = ctx.catalog.raw_dir("demo")
    assert (raw / "images" / "a.png").read_bytes() == b"generated"
    assert json.loads((raw / ".done" / "materialize.json").read_text())["kind"] == "demo"
    assert status(ctx, "demo").complete
    run(ctx)
    assert calls == [{"n_pairs": 3}]
    run(_with(ctx, force=True))
    assert len(calls) == 2
    changed = _context(tmp_path, {"demo": {"kind": "demo", "options": {"n_pairs": 4}}})
    assert not status(changed, "demo").complete
    run(changed)
    assert calls[-1] == {"n_pairs": 4} and status(changed, "demo").complete


def test_failed_materialisation_leaves_no_raw_folder(tmp_path, monkeypatch):
    _fake_kind(monkeypatch)
    ctx = _context(tmp_path, {"demo": {"kind": "demo", "options": {"fail": True}}})
    with pytest.raises(RuntimeError, match="generator failed"):
        run(ctx)
    assert os.listdir(tmp_path / "data" / "raw") == []


def test_remote_data_root_is_refused(tmp_path):
    (tmp_path / "catalog.yaml").write_text(
        yaml.safe_dump({"stores": {"data_root": "s3://bucket/data"}, "datasets": {"demo": {"kind": "demo"}}})
    )
    ctx = StageContext(load_catalog(tmp_path / "catalog.yaml", environ={}), ("demo",), QUIET)
    with pytest.raises(StageError, match=r"stores.data_root is 's3://bucket/data'; set it \(or PIPELINE_DATA_ROOT\)"):
        status(ctx, "demo")


def test_a_stalled_download_resumes_after_the_catalog_read_timeout(server, tmp_path):
    server.files[f"/{ZIP_NAME}"] = ZIP
    server.faults[f"/{ZIP_NAME}"] = ["stall"]
    source = _source(server.url(f"/{ZIP_NAME}"), ZIP, ZIP_NAME, read_timeout=0.5)
    run(_context(tmp_path, {"tss": {"kind": "tss", "sources": [source]}}))
    assert [r[2] for r in server.requests] == [None, f"bytes={len(ZIP) // 2}-"]
    assert (tmp_path / "data" / "raw" / "tss" / "downloads" / ZIP_NAME).read_bytes() == ZIP
