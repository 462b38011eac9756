"""Caching primitives: stable keys, atomic writes, and a ledger of committed units of work."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.damage import report_damage
from pipeline.errors import PipelineError

TEMP_MARK = ".tmp-"
_TEMP_NAME = re.compile(r"^\..*\.tmp-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short hex digest of ``obj``'s canonical JSON: equal settings give equal keys on every machine."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error remove it.

    Works for files and folders. A reader never sees a half-written ``path``: it is absent or complete.
    The temporary is named ``.<name>.tmp-<host>-<pid>-<random>``, so that ``sweep_temporaries`` can tell
    those of killed processes from those of running ones.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{owner}", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep_temporaries(root: str | Path) -> list[Path]:
    """Remove the ``atomic_path`` temporaries under ``root`` whose process (on this host) no longer runs.

    Returns what was removed. Temporaries of running processes, and of other hosts, are left alone.
    """
    removed = []
    host = socket.gethostname()
    for folder, names, _ in os.walk(root):
        for name in list(names):
            owner = _TEMP_NAME.match(name)
            if owner is None:
                continue
            names.remove(name)  # never walk into a temporary
            if owner["host"] == host and not _running(int(owner["pid"])):
                shutil.rmtree(Path(folder) / name, ignore_errors=True)
                removed.append(Path(folder) / name)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_store_root(path: str, what: str) -> None:
    """Make sure the local store root ``path`` is a writable folder (creating it); one-line error if not.

    ``what`` names the setting (``stores.outputs``). URLs (``s3://...``) are left to their filesystem.
    """
    if "://" in path:
        return
    root = Path(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as error:
        problem = "is a file, not a folder" if root.is_file() else f"is not a writable folder ({error.strerror})"
        raise PipelineError(f"{what} {root} {problem}; point it at a folder you can write") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


class Ledger:
    """Records which units of work are committed, one small JSON marker per unit under ``root``.

    One file per unit means concurrent writers (Dask tasks) never touch the same file, and a marker is
    written only after the unit's outputs were renamed into place, so a killed run leaves no false record.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _marker(self, unit: str) -> Path:
        safe = unit.replace("/", "__")
        return self.root / f"{safe}.json"

    def is_done(self, unit: str) -> bool:
        """Whether ``unit`` has been committed (by a marker that reads back intact)."""
        return self.record(unit) is not None

    def record(self, unit: str, required: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """The information stored when ``unit`` was committed, or None.

        A marker that is not a JSON object naming ``unit`` with the ``required`` keys is damaged: it is
        reported (and set aside during a run) and ``unit`` counts as not done.
        """
        return self._read(self._marker(unit), unit, required)

    def _read(self, marker: Path, unit: str | None, required: tuple[str, ...] = ()) -> dict[str, Any] | None:
        try:
            record = json.loads(marker.read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problem = f"unreadable ledger marker ({type(error).__name__}: {error})"
        else:
            expected = {"unit", *required}
            if not isinstance(record, dict):
                problem = f"the ledger marker holds a {type(record).__name__}, not an object"
            elif unit is not None and record.get("unit") != unit:
                problem = f"the ledger marker names unit {record.get('unit')!r}, not {unit!r}"
            elif not expected <= set(record) or not isinstance(record["unit"], str):
                problem = f"the ledger marker lacks {sorted(expected - set(record))}"
            else:
                return record
        report_damage(marker, problem, f"redoes unit {unit or marker.stem!r}")
        return None

    def mark_done(self, unit: str, info: Mapping[str, Any] | None = None) -> None:
        """Commit ``unit`` (call only after its outputs are in place)."""
        atomic_write_bytes(self._marker(unit), json.dumps({"unit": unit, **(info or {})}, indent=1).encode())

    def clear(self, unit: str) -> None:
        """Forget ``unit`` (for ``--force``); its outputs are overwritten by the next commit."""
        self._marker(unit).unlink(missing_ok=True)

    def done_units(self) -> list[str]:
        """Every committed unit, sorted."""
        if not self.root.is_dir():
            return []
        records = (self._read(marker, None) for marker in sorted(self.root.glob("*.json")))
        return sorted(record["unit"] for record in records if record is not None)
