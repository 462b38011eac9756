"""Progress bars for long work: tqdm on stderr, silenced by ``-q`` or when a run disables them."""

from __future__ import annotations

from tqdm.auto import tqdm


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
