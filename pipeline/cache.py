"""Caching primitives: stable keys, atomic writes, and a ledger of committed units of work."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short hex digest of ``obj``'s canonical JSON: equal settings give equal keys on every machine."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error remove it.

    Works for files and folders. A reader never sees a half-written ``path``: it is absent or complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
        """Whether ``unit`` has been committed."""
        return self._marker(unit).is_file()

    def record(self, unit: str) -> dict[str, Any] | None:
        """The information stored when ``unit`` was committed, or None."""
        try:
            return json.loads(self._marker(unit).read_text())
        except FileNotFoundError:
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
        return sorted(json.loads(p.read_text())["unit"] for p in self.root.glob("*.json"))
