"""Quick subsets of a dataset's test pairs: ``--category C`` and ``--max-pairs N``, chosen deterministically.

``--max-pairs N`` keeps the N pairs whose ids have the smallest sha256: a fixed, spread-out sample (every
category of SPair-71k is drawn from, not only the first by name) that is the same on every machine and
for every order of the rows. A run's subset is recorded in its ``config.json``; a run folder
holds results of one subset per dataset, so a quick try never mixes with, or replaces, a full run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import CatalogError, StageError


@dataclass(frozen=True)
class Subset:
    """Which test pairs to match: those of ``categories`` (all when empty), at most ``max_pairs`` of them."""

    categories: tuple[str, ...] = ()
    max_pairs: int | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record (for the run's config.json)."""
        return {"categories": sorted(self.categories), "max_pairs": self.max_pairs}

    def text(self) -> str:
        """``all pairs``, or e.g. ``categories cat, dog, at most 20 pairs``."""
        parts = [f"categories {', '.join(sorted(self.categories))}"] if self.categories else []
        parts += [f"at most {self.max_pairs} pairs"] if self.max_pairs is not None else []
        return ", ".join(parts) or "all pairs"


def _sample_order(pair_id: str) -> str:
    return hashlib.sha256(pair_id.encode()).hexdigest()


def select_pairs(rows: Sequence[dict[str, Any]], subset: Subset, dataset: str) -> list[dict[str, Any]]:
    """The pair rows of ``subset``, in their given order (sorted by id). A category the dataset lacks is a
    CatalogError listing its categories."""
    if subset.max_pairs is not None and subset.max_pairs < 1:
        raise CatalogError(f"--max-pairs must be >= 1, got {subset.max_pairs}")
    selected = list(rows)
    if subset.categories:
        known = sorted({row["category"] for row in rows})
        missing = sorted(set(subset.categories) - set(known))
        if missing:
            raise CatalogError(
                f"--category {', '.join(missing)}: dataset {dataset!r} has no such category; its categories: "
                f"{', '.join(known)} (pass --dataset to choose the dataset)"
            )
        selected = [row for row in rows if row["category"] in subset.categories]
    if subset.max_pairs is not None and len(selected) > subset.max_pairs:
        kept = set(sorted((row["pair_id"] for row in selected), key=_sample_order)[: subset.max_pairs])
        selected = [row for row in selected if row["pair_id"] in kept]
    return selected


def check_run_subset(config: dict[str, Any], dataset: str, subset: Subset, run: str) -> None:
    """Refuse to match ``subset`` of ``dataset`` into a run whose ``config.json`` holds another subset of it
    (a run folder made before subsets existed holds all pairs): StageError naming both and the way out."""
    recorded = config.get("datasets", {}).get(dataset)
    if recorded is None:
        return
    before = Subset(
        tuple(recorded.get("subset", {}).get("categories", ())), recorded.get("subset", {}).get("max_pairs")
    )
    if before != subset:
        raise StageError(
            f"run {run!r} holds {dataset} results of {before.text()}, this command asks for {subset.text()}; "
            "results of different subsets are never mixed: pass another --run NAME"
        )
