"""Damaged records found on read: one line each, the file set aside (never deleted), the unit redone.

Every store checks what it reads (ledger markers, Zarr metadata and chunks, Parquet parts and tables) and
reports a record that fails through :func:`report_damage`. During a run the damaged file is renamed to
``.<name>.damaged`` beside it (hidden, so globs and Parquet readers skip it) and its unit counts as not done,
so the run recomputes only that unit. Under :func:`inspecting` (``pipeline status``) nothing is moved: the
damage is only collected, to be shown.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DAMAGED_SUFFIX = ".damaged"


@dataclass(frozen=True)
class Damage:
    """One damaged record: its file, what is wrong, and what happens to it (or will, on the next run)."""

    path: str
    problem: str
    action: str

    def line(self) -> str:
        """The record as one line for the user."""
        return f"{self.path}: {self.problem}; {self.action}"


_REPAIR = contextvars.ContextVar("repair", default=True)
_FOUND: contextvars.ContextVar[list[Damage] | None] = contextvars.ContextVar("found", default=None)


def set_aside(path: str | Path) -> Path:
    """Rename ``path`` (a file or folder) to a free ``.<name>.damaged[.N]`` beside it; returns the new path."""
    path = Path(path)
    aside = path.with_name(f".{path.name}{DAMAGED_SUFFIX}")
    number = 1
    while aside.exists() or aside.is_symlink():
        number += 1
        aside = path.with_name(f".{path.name}{DAMAGED_SUFFIX}.{number}")
    os.replace(path, aside)
    return aside


def repairing() -> bool:
    """Whether damage found now is repaired (a run) rather than only reported (``pipeline status``)."""
    return _REPAIR.get()


def report_damage(path: str | Path, problem: str, redo: str, *, move: bool = True) -> Damage:
    """Report the damaged record ``path`` in one line and, during a run, set the file aside.

    ``redo`` says what recomputes the unit (``the run recomputes batch 3``); ``move`` False leaves the file
    where it is (the caller repairs it in place, e.g. a count reset to zero).
    """
    if not repairing():
        damage = Damage(str(path), problem, f"the next run {redo}")
    else:
        where = ""
        if move and (os.path.lexists(path)):
            where = f"moved to {set_aside(path)}; "
        damage = Damage(str(path), problem, f"{where}{redo}")
        log.warning("damaged: %s", damage.line())
    found = _FOUND.get()
    if found is not None and damage not in found:
        found.append(damage)
    return damage


@contextlib.contextmanager
def collecting(*, repair: bool = True) -> Iterator[list[Damage]]:
    """Collect every damage reported inside the block; ``repair`` False: report only, move nothing."""
    found: list[Damage] = []
    found_token = _FOUND.set(found)
    repair_token = _REPAIR.set(repair)
    try:
        yield found
    finally:
        _REPAIR.reset(repair_token)
        _FOUND.reset(found_token)
