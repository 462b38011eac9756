"""Matcher settings: typed parameters per method, ``--set`` overrides expanded into sweeps, and their keys.

A catalog matcher (``matchers.<name>: {method, params}``) gives one setting; ``--set NAME.KEY=V1,V2``
replaces a parameter of matcher ``NAME`` by each listed value, and several ``--set`` of one matcher span
their grid (``--set gwot.eps=0.02,0.05 --set gwot.k=3,5`` gives 4 settings). A setting is keyed by the
hash of its method, all its parameters and the feature store it reads, so a sweep writes beside earlier
results, never over them; its label (``gwot[eps=0.02,k=3]``, plain ``gwot`` without overrides) is for humans.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeline.cache import stable_hash
from pipeline.catalog import Catalog, MatcherSpec
from pipeline.config import from_mapping
from pipeline.errors import CatalogError, PipelineError
from stages.match.robust import robust_gwot


@dataclass(frozen=True)
class NNParams:
    """Nearest neighbours by cosine similarity, read out with a soft-argmax of ``softmax(sim / temperature)``
    in a ``window x window`` patch neighbourhood of the best match."""

    window: int = 3
    temperature: float = 0.02

    @property
    def needs_flipped(self) -> bool:
        """NN reads no mirrored features."""
        return False


@dataclass(frozen=True)
class GWOTParams:
    """The keyword arguments of :func:`stages.match.gwot` and of the flip/scale options of
    :func:`stages.match.robust.robust_gwot` (same names, same defaults: a test pins them), plus the plan
    readout's ``window`` (soft-argmax over the plan's mass near its mode)."""

    eps: float = 0.02
    w_s: float = 0.1
    k: int = 5
    k_trg: int | None = None
    w_y: float = 0.1
    rho: float = 1.0
    outer_iters: int = 10
    inner_iters: int = 50
    outer_tol: float = 1e-3
    inner_tol: float = 1e-4
    flip: str = "off"
    flip_margin: float = 0.02
    scale: str = "off"
    scale_rho: float = 0.1
    window: int = 3

    def solver_kwargs(self) -> dict[str, Any]:
        """The parameters :func:`stages.match.robust.robust_gwot` takes (all but the readout's)."""
        return {name: value for name, value in asdict(self).items() if name != "window"}

    @property
    def needs_flipped(self) -> bool:
        """Whether the setting reads the mirrored images' features (a backbone with ``flip: true``)."""
        return self.flip != "off"


PARAMS: dict[str, type[NNParams] | type[GWOTParams]] = {"nn": NNParams, "gwot": GWOTParams}
Params = NNParams | GWOTParams


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
        """Hash of method, parameters and feature store: equal settings share results, others never do."""
        return stable_hash({"method": self.method, "params": asdict(self.params), "backbone": self.backbone_key})

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
        }


def format_value(value: Any) -> str:
    """A parameter value as labels and messages show it (``0.02``, ``3``, ``inf``, ``true``)."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def parse_params(spec: MatcherSpec, overrides: Mapping[str, Any] | None = None) -> Params:
    """The typed, checked parameters of a catalog matcher with ``overrides`` applied.

    Raises CatalogError naming ``matchers.<name>.params.<key>`` for an unknown key (listing the valid
    ones), a value of the wrong type or one outside the method's domain.
    """
    where = f"matchers.{spec.name}.params"
    cls = PARAMS[spec.method]
    params = from_mapping(cls, {**spec.params, **(overrides or {})}, where)
    _check_domain(params, where)
    return params


def _check_domain(params: Params, where: str) -> None:
    """Reject values the readout or the solver would refuse, before any work is sent out."""
    if params.window < 1 or params.window % 2 == 0:
        raise CatalogError(f"{where}.window: must be a positive odd number of patches, got {params.window}")
    if isinstance(params, NNParams):
        if not params.temperature > 0:
            raise CatalogError(f"{where}.temperature: must be > 0, got {params.temperature}")
        return
    # The solver owns its domain checks: a one-patch problem runs them in microseconds.
    one_patch = torch.ones(1, 1, 1, 1)
    try:
        robust_gwot(one_patch, one_patch, src_flipped=one_patch, **params.solver_kwargs())
    except PipelineError as error:
        raise CatalogError(f"{where}: {error}") from None


def _parse_value(hint: Any, text: str, where: str) -> Any:
    """A ``--set`` value as the field's type: numbers (``inf``/``.inf`` too for floats), ``true``/``false``,
    ``none`` for an optional field, text as it is (a mode such as ``auto``; the solver checks it)."""
    text = text.strip()
    optional = typing.get_args(hint)
    if type(None) in optional:
        if text.lower() in ("none", "null"):
            return None
        (hint,) = (option for option in optional if option is not type(None))
    if hint is str:
        return text
    try:
        if hint is bool:
            return {"true": True, "false": False}[text.lower()]
        if hint is int:
            return int(text)
        if hint is float:
            return float(text.replace(".inf", "inf"))
    except (KeyError, ValueError):
        expected = {bool: "true or false", int: "an integer", float: "a number (inf allowed)"}[hint]
        raise CatalogError(f"{where}: expected {expected}, got {text!r}") from None
    raise TypeError(f"unsupported parameter type {hint!r} at {where}")


def parse_overrides(catalog: Catalog, overrides: Sequence[str]) -> dict[str, dict[str, tuple[Any, ...]]]:
    """``["gwot.eps=0.02,0.05", ...]`` -> ``{"gwot": {"eps": (0.02, 0.05)}}``, typed by the matcher's params.

    Raises CatalogError naming the ``--set`` for a malformed one, an unknown matcher or key, a bad value,
    or a key set twice.
    """
    parsed: dict[str, dict[str, tuple[Any, ...]]] = {}
    for text in overrides:
        where = f"--set {text}"
        target, equals, values = text.partition("=")
        name, dot, key = target.strip().rpartition(".")
        if not (equals and dot and name and key and values.strip()):
            raise CatalogError(f"{where}: expected MATCHER.KEY=VALUE[,VALUE...], e.g. gwot.eps=0.02,0.05")
        try:
            spec = catalog.matcher(name)
        except CatalogError as error:
            raise CatalogError(f"{where}: {error}") from None
        cls = PARAMS[spec.method]
        fields = {f.name for f in dataclasses.fields(cls)}
        if key not in fields:
            raise CatalogError(
                f"{where}: unknown key {key!r} of matcher {name!r} (method {spec.method}); "
                f"valid keys are {', '.join(sorted(fields))}"
            )
        if key in parsed.get(name, {}):
            raise CatalogError(f"{where}: {name}.{key} is set twice; list all its values in one --set")
        hint = typing.get_type_hints(cls)[key]
        parsed.setdefault(name, {})[key] = tuple(
            _parse_value(hint, value, f"{where} ({name}.{key})") for value in values.split(",")
        )
    return parsed


def resolve_settings(
    catalog: Catalog, names: Sequence[str], overrides: Sequence[str], backbone_key: str
) -> list[MatcherSetting]:
    """Every setting to run: the named catalog matchers (all when ``names`` is empty), each expanded over
    the grid of its ``--set`` overrides, for the feature store ``backbone_key``. Duplicates are dropped."""
    names = tuple(dict.fromkeys(names)) or tuple(catalog.matchers)
    specs = [catalog.matcher(name) for name in names]
    sweeps = parse_overrides(catalog, overrides)
    unselected = sorted(set(sweeps) - set(names))
    if unselected:
        raise CatalogError(
            f"--set names matcher(s) {', '.join(unselected)} that are not selected (--matcher {' '.join(names)})"
        )
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
