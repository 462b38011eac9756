"""Matcher settings: catalog matchers expanded over their ``--set`` sweeps, and the settings' keys.

A catalog matcher (``matchers.<name>: {method, params}``) gives one setting; ``--set NAME.KEY=V1,V2``
replaces a parameter of matcher ``NAME`` by each listed value, and several ``--set`` of one matcher span
their grid (``--set gwot.eps=0.02,0.05 --set gwot.k=3,5`` gives 4 settings). A setting is keyed by the
hash of its method, all its parameters and the feature store it reads, so a sweep writes beside earlier
results, never over them; its label (``gwot[eps=0.02,k=3]``, plain ``gwot`` without overrides) is for humans.
The typed parameters, their domains and the ``--set`` parsing live in :mod:`stages.matcher_params`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.cache import stable_hash
from pipeline.catalog import Catalog
from stages.matcher_params import GWOTParams, NNParams, Params, format_value, parse_params, select_sweeps

# Each method's implementation version, part of every setting's key: bump it with any change to the
# method's solver or readout that alters numbers, so results of the older code are never taken as done.
IMPLEMENTATION_VERSIONS = {"nn": 1, "gwot": 4}  # gwot 2: per-pair convergence, coarse-to-fine; 3: flip order vote;
# 4: block-shared window products (plans change at float rounding)

__all__ = [
    "IMPLEMENTATION_VERSIONS",
    "GWOTParams",
    "MatcherSetting",
    "NNParams",
    "Params",
    "parse_params",
    "resolve_settings",
]


@dataclass(frozen=True)
class MatcherSetting:
    """One resolved matcher setting: the catalog matcher it comes from, its parameters and its feature store.

    ``overrides`` are the ``(key, value)`` pairs a sweep changed, in the order given; ``backbone_key`` names
    the feature store (features from other weights or canvases are other results).
    """

    name: str
    method: str
    params: Params
    backbone_key: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        """Hash of method, its implementation version, parameters and feature store: equal settings share
        results, others (and those of other code versions) never do."""
        return stable_hash(
            {
                "method": self.method,
                "implementation": IMPLEMENTATION_VERSIONS[self.method],
                "params": asdict(self.params),
                "backbone": self.backbone_key,
            }
        )

    @property
    def label(self) -> str:
        """``name[key=value,...]`` for the swept keys, or ``name`` alone."""
        if not self.overrides:
            return self.name
        return f"{self.name}[{','.join(f'{key}={format_value(value)}' for key, value in self.overrides)}]"

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record of the setting (for the run's config.json)."""
        return {
            "name": self.name,
            "label": self.label,
            "method": self.method,
            "params": asdict(self.params),
            "backbone_key": self.backbone_key,
            "implementation": IMPLEMENTATION_VERSIONS[self.method],
        }


def resolve_settings(
    catalog: Catalog, names: Sequence[str], overrides: Sequence[str], backbone_key: str
) -> list[MatcherSetting]:
    """Every setting to run: the named catalog matchers (all when ``names`` is empty), each expanded over
    the grid of its ``--set`` overrides, for the feature store ``backbone_key``. Duplicates are dropped."""
    specs, sweeps = select_sweeps(catalog, names, overrides)
    settings: dict[str, MatcherSetting] = {}
    for spec in specs:
        sweep = sweeps.get(spec.name, {})
        for values in itertools.product(*sweep.values()):
            changed = tuple(zip(sweep, values, strict=True))
            setting = MatcherSetting(
                name=spec.name,
                method=spec.method,
                params=parse_params(spec, dict(changed)),
                backbone_key=backbone_key,
                overrides=changed,
            )
            settings.setdefault(setting.key, setting)
    return list(settings.values())
