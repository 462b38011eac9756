"""Provenance: the package version, git commit, library versions, device and date behind a result.

Recorded in a run's ``config.json`` and in every result part's Parquet metadata, so a number can be traced
to the code and libraries that computed it. Versions are read from the installed distributions' metadata:
nothing here imports torch or any other library it reports on.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pipeline

# The libraries whose versions can change the numbers, by distribution name; an absent one (POT) is skipped.
LIBRARIES = ("torch", "timm", "numpy", "zarr", "dask", "distributed", "pot")
SOURCE_ROOT = Path(pipeline.__file__).resolve().parents[1]  # the checkout the code runs from


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):  # no git, or a hung file system
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout this code runs from, suffixed ``-dirty`` when tracked files differ from
    it; None when the code is not in a git checkout of its own (an installed package)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != SOURCE_ROOT:
        return None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None
    return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """``{distribution: version}`` of the installed ``LIBRARIES``."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def provenance(device: str) -> dict[str, Any]:
    """A JSON-ready record: package version, git commit (or None), Python and library versions, the
    compute ``device`` (e.g. ``cpu``, ``cuda (NVIDIA H200)``) and the UTC date and time."""
    return {
        "version": pipeline.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "device": device,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
