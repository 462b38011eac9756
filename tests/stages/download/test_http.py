"""Tests of fetching a file over HTTP: resume, restart, retries, mirrors, checksums, fast offline failure."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import urllib.error
from pathlib import Path

import pytest

from pipeline.catalog import Source
from pipeline.errors import ChecksumError, DownloadError
from stages.download import http
from stages.download.http import fetch, resolve_url, verify

PAYLOAD = os.urandom(200_003)  # odd length: the dropped half and the resumed half differ in size
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


def _source(url: str, *mirrors: str, size: int | None = len(PAYLOAD), sha256: str | None = SHA256) -> Source:
    return Source(url=url, filename="data.zip", size=size, sha256=sha256, mirrors=mirrors)


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    server.files["/data.zip"] = PAYLOAD
    server.faults["/data.zip"] = ["drop"]
    path = fetch(_source(server.url("/data.zip")), tmp_path, backoff=0.0, timeout=5)
    assert path == tmp_path / "data.zip"
    assert path.read_bytes() == PAYLOAD
    half = len(PAYLOAD) // 2
    assert [r[2] for r in server.requests] == [None, f"bytes={half}-"]
    assert sorted(os.listdir(tmp_path)) == ["data.zip"]


def test_part_file_of_an_earlier_run_is_resumed(server, tmp_path):
    server.files["/data.zip"] = PAYLOAD
    (tmp_path / "data.zip.part").write_bytes(PAYLOAD[:1000])
    fetch(_source(server.url("/data.zip")), tmp_path, backoff=0.0, timeout=5)
    assert (tmp_path / "data.zip").read_bytes() == PAYLOAD
    assert [r[2] for r in server.requests] == ["bytes=1000-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["/data.zip"] = PAYLOAD
    server.faults["/data.zip"] = ["drop"]
    server.ignore_range.add("/data.zip")
    fetch(_source(server.url("/data.zip")), tmp_path, backoff=0.0, timeout=5)
    assert (tmp_path / "data.zip").read_bytes() == PAYLOAD
    assert [r[2] for r in server.requests] == [None, f"bytes={len(PAYLOAD) // 2}-"]


def test_complete_part_file_answered_416_restarts(server, tmp_path):
    server.files["/data.zip"] = PAYLOAD
    (tmp_path / "data.zip.part").write_bytes(PAYLOAD)
    fetch(_source(server.url("/data.zip")), tmp_path, backoff=0.0, timeout=5)
    assert (tmp_path / "data.zip").read_bytes() == PAYLOAD
    assert [r[2] for r in server.requests] == [f"bytes={len(PAYLOAD)}-", None]


def test_server_errors_are_retried_with_exponential_backoff(server, tmp_path):
    server.files["/data.zip"] = PAYLOAD
    server.faults["/data.zip"] = ["500", "500", "500"]
    sleeps: list[float] = []
    fetch(_source(server.url("/data.zip")), tmp_path, backoff=0.5, sleep=sleeps.append, timeout=5)
    assert sleeps == [0.5, 1.0, 2.0]
    assert (tmp_path / "data.zip").read_bytes() == PAYLOAD


def test_retries_are_bounded_then_the_url_is_given_up(server, tmp_path):
    server.files["/data.zip"] = PAYLOAD
    server.faults["/data.zip"] = ["500"] * 5
    with pytest.raises(DownloadError, match=r"HTTP 500 .*gave up after 2 retries"):
        fetch(_source(server.url("/data.zip")), tmp_path, retries=2, backoff=0.0, timeout=5)
    assert server.count("/data.zip") == 3


@pytest.mark.parametrize(
    "sha256, size, problem",
    [
        ("0" * 64, len(PAYLOAD), rf"sha256 mismatch for data.zip: expected 0{{64}}, got {SHA256}"),
        (
            SHA256,
            len(PAYLOAD) + 1,
            rf"size mismatch for data.zip: expected {len(PAYLOAD) + 1} bytes, got {len(PAYLOAD)}",
        ),
    ],
)
def test_checksum_mismatch_deletes_the_file(server, tmp_path, sha256, size, problem):
    server.files["/data.zip"] = PAYLOAD
    with pytest.raises(ChecksumError, match=problem):
        fetch(_source(server.url("/data.zip"), size=size, sha256=sha256), tmp_path, backoff=0.0, timeout=5)
    assert os.listdir(tmp_path) == []


def test_bad_checksum_on_the_url_falls_back_to_a_good_mirror(server, tmp_path):
    server.files["/wrong.zip"] = b"<html>moved</html>"
    server.files["/data.zip"] = PAYLOAD
    fetch(_source(server.url("/wrong.zip"), server.url("/data.zip")), tmp_path, backoff=0.0, timeout=5)
    assert (tmp_path / "data.zip").read_bytes() == PAYLOAD


@pytest.mark.parametrize("failing", ["missing", "refused"])
def test_mirror_is_used_after_the_url_fails(server, tmp_path, closed_port_url, failing):
    server.files["/data.zip"] = PAYLOAD
    first = server.url("/gone.zip") if failing == "missing" else closed_port_url
    fetch(_source(first, server.url("/data.zip")), tmp_path, backoff=0.0, timeout=5)
    assert (tmp_path / "data.zip").read_bytes() == PAYLOAD
    assert server.count("/gone.zip") == (1 if failing == "missing" else 0)
    assert server.count("/data.zip") == 1


def test_no_network_fails_fast_naming_every_url_and_the_manual_fix(tmp_path, closed_port_url):
    mirror = closed_port_url.replace("file.zip", "mirror.zip")
    started = time.monotonic()
    with pytest.raises(DownloadError, match="from any of its 2 URL") as info:
        fetch(_source(closed_port_url, mirror), tmp_path)  # the default retry schedule
    assert time.monotonic() - started < 2.0
    message = str(info.value)
    assert closed_port_url in message and mirror in message
    assert "cannot connect" in message
    assert f"copy it to {tmp_path / 'data.zip'}" in message
    assert "`--archive PATH --dataset <name>` to `pipeline run --stage download`" in message
    assert not isinstance(info.value, ChecksumError)


def test_dns_failure_is_not_retried(tmp_path):
    calls: list[str] = []

    class NoDns:
        def open(self, request, timeout):
            calls.append(request.full_url)
            raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    with pytest.raises(DownloadError, match=r"https://example.invalid/a.zip: cannot connect \(.*Name or service"):
        fetch(_source("https://example.invalid/a.zip"), tmp_path, opener=NoDns(), sleep=pytest.fail)
    assert calls == ["https://example.invalid/a.zip"]


def test_gdrive_mirror_follows_the_confirmation_page(server, tmp_path, monkeypatch):
    monkeypatch.setattr(http, "GDRIVE_URL", server.url("/uc?export=download&id={id}"))
    server.files["/uc"] = PAYLOAD
    server.confirm_pages.add("/uc")
    fetch(_source(server.url("/gone.zip"), "gdrive:FILEID"), tmp_path, backoff=0.0, timeout=5)
    assert (tmp_path / "data.zip").read_bytes() == PAYLOAD
    drive = [(path, query) for path, query, _ in server.requests if path == "/uc"]
    assert drive == [
        ("/uc", "export=download&id=FILEID"),
        ("/uc", "id=FILEID&export=download&confirm=t&uuid=abc-123"),
    ]


def test_gdrive_page_without_a_form_fails_with_a_reason(server, tmp_path, monkeypatch):
    monkeypatch.setattr(http, "GDRIVE_URL", server.url("/quota?id={id}"))
    server.files["/quota"] = b"<html><head><title>Quota exceeded</title></head><body>Too many users</body></html>"
    server.content_types["/quota"] = "text/html; charset=utf-8"
    with pytest.raises(DownloadError, match=r"gdrive:X: Google Drive answered an HTML page \('Quota exceeded'\)"):
        fetch(_source("gdrive:X"), tmp_path, backoff=0.0, timeout=5)
    assert os.listdir(tmp_path) == []


def test_gdrive_page_after_confirmation_fails_instead_of_saving_html(server, tmp_path, monkeypatch):
    monkeypatch.setattr(http, "GDRIVE_URL", server.url("/uc?export=download&id={id}"))
    server.files["/uc"] = b"<html><head><title>Sign in</title></head></html>"
    server.content_types["/uc"] = "text/html"
    server.confirm_pages.add("/uc")
    with pytest.raises(DownloadError, match="gdrive:X: Google Drive answered an HTML page again after the confirm"):
        fetch(_source("gdrive:X", size=None, sha256=None), tmp_path, backoff=0.0, timeout=5)
    assert server.count("/uc") == 2
    assert os.listdir(tmp_path) == []


def test_resolve_url_maps_gdrive_ids():
    assert resolve_url("gdrive:1KSvB0k2") == "https://drive.google.com/uc?export=download&id=1KSvB0k2"
    assert resolve_url("https://x.org/a.zip") == "https://x.org/a.zip"


def test_verify_returns_the_sha256_and_accepts_unknown_checksums(tmp_path):
    path = tmp_path / "data.zip"
    path.write_bytes(PAYLOAD)
    assert verify(path, _source("u", size=None, sha256=None)) == SHA256
    assert verify(path, _source("u", sha256=SHA256.upper())) == SHA256
    with pytest.raises(ChecksumError, match=r"^hand.zip: size mismatch for data.zip: expected 5 bytes"):
        verify(path, _source("u", size=5), label=Path("hand.zip"))


def test_a_stalled_transfer_times_out_and_resumes_where_it_stopped(server, tmp_path):
    server.files["/data.zip"] = PAYLOAD
    server.faults["/data.zip"] = ["stall"]
    start = time.monotonic()
    path = fetch(_source(server.url("/data.zip")), tmp_path, backoff=0.0, timeout=0.5)
    assert path.read_bytes() == PAYLOAD and time.monotonic() - start < server.stall
    assert [r[2] for r in server.requests] == [None, f"bytes={len(PAYLOAD) // 2}-"]


def test_a_full_disk_is_one_line_naming_the_space_needed_and_keeps_the_partial_file(server, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    server.files["/data.zip"] = PAYLOAD
    (tmp_path / "data.zip.part").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(DownloadError) as failed:
        fetch(_source(server.url("/data.zip")), tmp_path, backoff=0.0, timeout=5)
    part = tmp_path / "data.zip.part"
    assert str(failed.value) == (
        f"{part}: the disk is full after 0 bytes ({len(PAYLOAD)} more bytes needed); free space and run again: "
        "the download resumes from this partial file"
    )
    assert part.is_symlink() and not (tmp_path / "data.zip").exists() and len(server.requests) == 1
