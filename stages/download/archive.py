"""Safe, all-or-nothing extraction of .zip, .tar, .tar.gz/.tgz archives.

Only regular files and folders are extracted, by writing them ourselves (never ``extractall``). An entry is
refused, with UnsafeArchiveError naming the archive and the entry, when it would land outside the target
(``..`` components, absolute paths, Windows drive letters) or when it is a link (symbolic or hard: the
benchmarks ship none, so every link is refused rather than judged), a device file or a FIFO. The archive is
unpacked into a temporary folder beside the target that is renamed into place only when every entry was
extracted, so a refused or broken archive leaves nothing behind. Finder junk (``__MACOSX/``, ``.DS_Store``)
is skipped.

Limits: an archive that expands to more than ``max_ratio`` times its own size or ``max_bytes`` in all (a
"zip bomb") is refused, counting the bytes actually written (headers can lie). The defaults leave room for
the real benchmarks (images and annotations expand at most about 10-fold); a catalog source raises them
with ``max_ratio`` and ``max_extracted_bytes``. An entry that cannot be extracted (an encrypted one, an
unsupported compression method, a name the filesystem refuses) and a full disk are DownloadErrors naming it.
"""

from __future__ import annotations

import errno
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from pipeline.cache import atomic_path
from pipeline.errors import DownloadError, UnsafeArchiveError

SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
DEFAULT_MAX_RATIO = 100.0
DEFAULT_MAX_BYTES = 200 * 1024**3
CHUNK_BYTES = 1 << 20
JUNK_FOLDERS = frozenset({"__MACOSX"})
JUNK_FILES = frozenset({".DS_Store"})
_DRIVE = re.compile(r"^[A-Za-z]:")


def is_archive(path: str | Path) -> bool:
    """Whether ``path``'s name ends with a suffix that ``extract`` knows."""
    return str(path).lower().endswith(SUFFIXES)


def _safe_relative(archive: Path, name: str) -> PurePosixPath | None:
    """The entry's path inside the target, None for junk and for the root; refuses escaping names."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise UnsafeArchiveError(f"{archive}: refusing entry {name!r}: absolute path; nothing was extracted")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: refusing entry {name!r}: '..' leaves the target; nothing was extracted")
    if not parts or JUNK_FOLDERS.intersection(parts) or parts[-1] in JUNK_FILES:
        return None
    return PurePosixPath(*parts)


def _refuse_type(archive: Path, name: str, what: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{archive}: refusing entry {name!r}: {what} not allowed; nothing was extracted")


def _zip_entries(archive: Path, zf: zipfile.ZipFile) -> Iterator[tuple[PurePosixPath, IO[bytes] | None]]:
    """``(path in target, reader)`` per zip entry (reader None: a folder); junk skipped, unsafe refused."""
    for info in zf.infolist():
        relative = _safe_relative(archive, info.filename)
        # Unix file type bits; 0 when the zip tool did not record them (then the entry is a plain file)
        file_type = stat.S_IFMT(info.external_attr >> 16)
        if file_type == stat.S_IFLNK:
            raise _refuse_type(archive, info.filename, "a symbolic link is")
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _refuse_type(archive, info.filename, "a device file or FIFO is")
        if relative is None:
            continue
        try:
            reader = None if info.is_dir() else zf.open(info)
        except (RuntimeError, NotImplementedError) as exc:  # encrypted; an unsupported compression method
            raise DownloadError(
                f"{archive}: cannot extract entry {info.filename!r}: {exc}; nothing was extracted"
            ) from None
        yield relative, reader


def _tar_entries(archive: Path, tf: tarfile.TarFile) -> Iterator[tuple[PurePosixPath, IO[bytes] | None]]:
    """``(path in target, reader)`` per tar member (reader None: a folder); junk skipped, unsafe refused."""
    for member in tf:
        relative = _safe_relative(archive, member.name)
        if member.issym() or member.islnk():
            raise _refuse_type(archive, member.name, f"a link (to {member.linkname!r}) is")
        if not (member.isfile() or member.isdir()):
            raise _refuse_type(archive, member.name, "a device file or FIFO is")
        if relative is not None:
            yield relative, tf.extractfile(member) if member.isfile() else None


def _unpack(
    archive: Path, entries: Iterator[tuple[PurePosixPath, IO[bytes] | None]], into: Path, budget: int, limit: str
) -> None:
    """Write the entries under ``into``; refuse the archive once more than ``budget`` bytes came out."""
    for relative, reader in entries:
        dest = into.joinpath(relative)
        try:
            if reader is None:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with reader, open(dest, "wb") as out:
                while chunk := reader.read(CHUNK_BYTES):
                    budget -= len(chunk)
                    if budget < 0:
                        raise DownloadError(f"{archive}: expands to more than {limit}; nothing was extracted")
                    out.write(chunk)
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
            raise DownloadError(f"{archive}: entry {str(relative)!r} is both a file and a folder ({exc})") from exc
        except (RuntimeError, NotImplementedError) as exc:  # zipfile: encrypted; an unsupported method
            raise DownloadError(
                f"{archive}: cannot extract entry {str(relative)!r}: {exc}; nothing was extracted"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(into).free
                raise DownloadError(
                    f"{archive}: the disk under {into.parent.parent} is full ({free} bytes free; the archive is "
                    f"{archive.stat().st_size} bytes compressed and expands up to {limit}); free space and run "
                    "again; nothing was extracted"
                ) from None
            raise DownloadError(
                f"{archive}: cannot extract entry {str(relative)!r}: {exc.strerror}; nothing was extracted"
            ) from None


def extract(archive: Path, target: Path, *, max_ratio: float | None = None, max_bytes: int | None = None) -> None:
    """Unpack ``archive`` so that ``target`` holds exactly its contents (a previous ``target`` is replaced).

    Raises UnsafeArchiveError for a refused entry and DownloadError for an unknown suffix, a corrupt
    archive, one that expands beyond ``max_ratio`` times its size or ``max_bytes`` (defaults:
    ``DEFAULT_MAX_RATIO``, ``DEFAULT_MAX_BYTES``), an entry that cannot be extracted or a full disk; in
    every case ``target`` is left as it was.
    """
    archive, target = Path(archive), Path(target)
    if not is_archive(archive):
        raise DownloadError(f"{archive}: cannot extract: the name must end with one of {', '.join(SUFFIXES)}")
    ratio = DEFAULT_MAX_RATIO if max_ratio is None else max_ratio
    total = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    budget = min(total, int(ratio * max(archive.stat().st_size, 1)))
    limit = (
        f"{budget} bytes (the limits: {ratio:g} times its size, max_ratio, and {total} bytes, max_extracted_bytes, "
        "of its catalog source)"
    )
    try:
        with atomic_path(target) as tmp:
            tmp.mkdir()
            if archive.name.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    _unpack(archive, _zip_entries(archive, zf), tmp, budget, limit)
            else:
                with tarfile.open(archive, "r:*") as tf:
                    _unpack(archive, _tar_entries(archive, tf), tmp, budget, limit)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise DownloadError(
            f"{archive}: corrupt or truncated archive ({exc}); delete it and download it again"
        ) from exc
