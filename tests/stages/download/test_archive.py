"""Tests of safe extraction: good archives unpack fully minus junk; hostile ones are refused, leaving none."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.errors import DownloadError, UnsafeArchiveError
from stages.download.archive import extract

GOOD = {
    "TSS/FG3DCar/pair1/image1.png": b"png-bytes",
    "TSS/FG3DCar/pair1/flow1.flo": b"flo",
    "TSS/readme.txt": b"hi",
}
JUNK = {"__MACOSX/TSS/._readme.txt": b"apple", "TSS/.DS_Store": b"finder", "TSS/FG3DCar/.DS_Store": b"finder"}


def _write_zip(path: Path, files: dict[str, bytes], extra: list[zipfile.ZipInfo | tuple[zipfile.ZipInfo, bytes]] = ()):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("TSS/", b"")  # an explicit folder entry, as zip tools write them
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return path


def _tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def _write_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            tf.addfile(*_tar_file(name, data))
        for info in extra:
            tf.addfile(info)
    return path


def _files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["good.zip", "good.tar.gz", "good.tgz", "good.tar"])
def test_good_archive_extracts_fully_and_skips_junk(tmp_path, name):
    archive = tmp_path / name
    if name.endswith(".zip"):
        _write_zip(archive, {**GOOD, **JUNK})
    else:
        _write_tar(archive, {**GOOD, **JUNK})
    target = tmp_path / "out"
    extract(archive, target)
    assert _files_under(target) == GOOD
    assert sorted(os.listdir(tmp_path)) == sorted([name, "out"])  # no temporary folder left behind


def test_extract_replaces_a_previous_target(tmp_path):
    archive = _write_zip(tmp_path / "good.zip", GOOD)
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    extract(archive, target)
    assert _files_under(target) == GOOD


def _zip_link(name: str, pointee: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, pointee.encode()


def _zip_fifo(name: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return info, b""


def _tar_link(name: str, pointee: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = pointee
    return info


def _tar_device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


HOSTILE_ZIPS = {
    "parent": ({"TSS/../../evil": b"x"}, [], r"'TSS/../../evil': '\.\.' leaves the target"),
    "absolute": ({"/tmp/evil": b"x"}, [], r"'/tmp/evil': absolute path"),
    "drive": ({"C:/evil": b"x"}, [], r"'C:/evil': absolute path"),
    "backslash": ({"..\\evil": b"x"}, [], r"'\.\.\\\\evil': '\.\.' leaves the target"),
    "symlink": (
        {},
        [_zip_link("TSS/link", "../../etc/passwd")],
        r"'TSS/link': a symbolic link is not allowed",
    ),
    "fifo": ({}, [_zip_fifo("TSS/pipe")], r"'TSS/pipe': a device file or FIFO is not allowed"),
}
HOSTILE_TARS = {
    "parent": ({"../evil": b"x"}, [], r"'\.\./evil': '\.\.' leaves the target"),
    "absolute": ({"/tmp/evil": b"x"}, [], r"'/tmp/evil': absolute path"),
    "symlink": (
        {},
        [_tar_link("TSS/link", "/etc/passwd", tarfile.SYMTYPE)],
        r"'TSS/link': a link \(to '/etc/passwd'\)",
    ),
    "hardlink": (
        {},
        [_tar_link("TSS/hard", "../../outside", tarfile.LNKTYPE)],
        r"'TSS/hard': a link \(to '\.\./\.\./",
    ),
    "device": ({}, [_tar_device("TSS/null")], r"'TSS/null': a device file or FIFO is not allowed"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ZIPS))
def test_hostile_zip_is_refused_and_nothing_is_kept(tmp_path, case):
    files, extra, problem = HOSTILE_ZIPS[case]
    archive = _write_zip(tmp_path / "evil.zip", {**GOOD, **files}, extra)
    _assert_refused_leaving_target_untouched(tmp_path, archive, problem)


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_tar_gz_is_refused_and_nothing_is_kept(tmp_path, case):
    files, extra, problem = HOSTILE_TARS[case]
    archive = _write_tar(tmp_path / "evil.tar.gz", {**GOOD, **files}, extra)
    _assert_refused_leaving_target_untouched(tmp_path, archive, problem)


def _assert_refused_leaving_target_untouched(tmp_path: Path, archive: Path, problem: str) -> None:
    target = tmp_path / "work" / "out"
    target.mkdir(parents=True)
    (target / "earlier.txt").write_text("kept")
    with pytest.raises(UnsafeArchiveError, match=rf"evil\.(zip|tar\.gz): refusing entry {problem}"):
        extract(archive, target)
    assert _files_under(target) == {"earlier.txt": b"kept"}  # the good entries extracted first are gone too
    assert os.listdir(tmp_path / "work") == ["out"]
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("name", ["broken.zip", "broken.tar.gz"])
def test_truncated_archive_is_a_download_error(tmp_path, name):
    archive = tmp_path / name
    if name.endswith(".zip"):
        _write_zip(archive, GOOD)
    else:
        _write_tar(archive, {"big.bin": os.urandom(50_000)})
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DownloadError, match=rf"{name}: corrupt or truncated archive"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_suffix_is_refused(tmp_path):
    (tmp_path / "data.rar").write_bytes(b"x")
    with pytest.raises(DownloadError, match=r"data\.rar: cannot extract: the name must end with one of \.zip"):
        extract(tmp_path / "data.rar", tmp_path / "out")
