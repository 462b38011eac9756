"""Tests of safe extraction: good archives unpack fully minus junk; hostile ones are refused, leaving none."""

from __future__ import annotations

import io
import os
import stat
import subprocess
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


def _zeros(size: int) -> bytes:
    return bytes(size)


@pytest.mark.parametrize("name", ["bomb.zip", "bomb.tar.gz"])
def test_a_bomb_is_refused_unless_the_catalog_raises_the_limit(tmp_path, name):
    archive = tmp_path / name
    files = {"TSS/zeros.bin": _zeros(16 << 20)}  # 16 MiB of zeros in about 16 kB
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("TSS/zeros.bin", files["TSS/zeros.bin"])
    else:
        _write_tar(archive, files)
    assert archive.stat().st_size < 50_000
    target = tmp_path / "out"
    with pytest.raises(DownloadError, match=rf"^{archive}: expands to more than \d+ bytes \(the limits: 100 times"):
        extract(archive, target)
    assert not target.exists() and _no_temporaries(tmp_path)
    with pytest.raises(DownloadError, match=r"expands to more than 1000000 bytes"):
        extract(archive, target, max_ratio=10_000, max_bytes=1_000_000)
    extract(archive, target, max_ratio=10_000)
    assert (target / "TSS" / "zeros.bin").stat().st_size == 16 << 20


def _no_temporaries(folder: Path) -> bool:
    return not any(p.name.startswith(".") for p in folder.rglob("*"))


ZIP_HEADER_FIELDS = {"flags": (6, 8), "method": (8, 10)}  # offsets in local headers and central records


def _patch_headers(archive: Path, field: str, value: int) -> None:
    """Rewrite a 2-byte header field of every entry (local headers and central directory) to ``value``."""
    data = bytearray(archive.read_bytes())
    for signature, offset in zip((b"PK\x03\x04", b"PK\x01\x02"), ZIP_HEADER_FIELDS[field], strict=True):
        start = data.find(signature)
        while start != -1:
            data[start + offset : start + offset + 2] = value.to_bytes(2, "little")
            start = data.find(signature, start + 4)
    archive.write_bytes(bytes(data))


def test_entries_that_cannot_be_extracted_are_named(tmp_path):
    long_name = f"TSS/{'n' * 300}.png"
    archive = _write_zip(tmp_path / "long.zip", {long_name: b"x"})
    with pytest.raises(DownloadError, match=rf"^{archive}: cannot extract entry '{long_name}': File name too long"):
        extract(archive, tmp_path / "out")

    archive = tmp_path / "encrypted.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("TSS/secret.png", b"x")
    _patch_headers(archive, "flags", 0x1)  # the entry claims to be encrypted
    with pytest.raises(DownloadError, match=r"cannot extract entry 'TSS/secret.png': File .* is encrypted"):
        extract(archive, tmp_path / "out")

    archive = _write_zip(tmp_path / "deflate64.zip", {"TSS/a.png": b"x"})
    _patch_headers(archive, "method", 9)  # Deflate64, which zipfile cannot read
    with pytest.raises(DownloadError, match=r"cannot extract entry 'TSS/.*': .*compression method is not supported"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_during_extraction_is_one_line(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs privileges")
    try:
        archive = _write_zip(tmp_path / "big.zip", {"TSS/a.bin": os.urandom(2 << 20)})
        with pytest.raises(DownloadError, match=rf"^{archive}: the disk under {disk} is full \(\d+ bytes free;"):
            extract(archive, disk / "out")
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
