"""Progress bars for long work: tqdm on stderr, silenced by ``-q`` or when a run disables them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T], *, enabled: bool, total: int | None = None, desc: str = "", unit: str = "it"
) -> Iterator[T]:
    """Iterate over ``items`` with a progress bar when ``enabled``."""
    yield from tqdm(items, total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


def progress_bar(*, enabled: bool, total: int | None = None, desc: str = "", unit: str = "it") -> tqdm:
    """A manual progress bar (``update(n)``), e.g. for bytes downloaded or futures completed."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
    )
