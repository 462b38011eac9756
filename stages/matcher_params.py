"""Matcher parameters: each method's typed parameters with their defaults and domains, and ``--set`` parsing.

Light on purpose (no torch, no stores): before any stage starts, ``pipeline run`` and ``match-pair`` check
the catalog's matchers and the command line's ``--matcher`` and ``--set``, so a bad value is reported at once
and named where it came from (``matchers.gwot.params.eps`` in the catalog, ``--set gwot.eps=-1`` on the
command line). The domains include every check the solvers make on their own arguments (a test holds
them to it) and a few more (non-negative tolerances).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from pipeline.catalog import Catalog, MatcherSpec
from pipeline.config import from_mapping
from pipeline.errors import CatalogError

Rule = tuple[Callable[[Any], bool], str]  # (accepts the value, what the value must be)
MIN_EPS = 1e-4  # GWOT's smallest entropic regularisation, in units of the feature cost (range [0, 2])
POSITIVE: Rule = (lambda value: 0 < value < math.inf, "must be a finite number > 0")
NON_NEGATIVE: Rule = (lambda value: 0 <= value < math.inf, "must be a finite number >= 0")
AT_LEAST_ONE: Rule = (lambda value: value >= 1, "must be >= 1")
POSITIVE_ODD: Rule = (lambda value: value >= 1 and value % 2 == 1, "must be a positive odd number")
PATCH_WINDOW: Rule = (POSITIVE_ODD[0], "must be a positive odd number of patches")
ENTROPY: Rule = (
    lambda value: MIN_EPS <= value < math.inf,
    f"must be a finite number >= {MIN_EPS:g} (the feature cost spans [0, 2]; a smaller eps underflows the "
    "float32 solve)",
)


@dataclass(frozen=True)
class NNParams:
    """Nearest neighbours by cosine similarity, read out with a soft-argmax of ``softmax(sim / temperature)``
    in a ``window x window`` patch neighbourhood of the best match."""

    window: int = 3
    temperature: float = 0.02

    needs_flipped: ClassVar[bool] = False  # NN reads no mirrored features

    DOMAIN: ClassVar[dict[str, Rule]] = {"window": PATCH_WINDOW, "temperature": POSITIVE}


@dataclass(frozen=True)
class GWOTParams:
    """The keyword arguments of :func:`stages.match.gwot` and the flip/scale options of
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
    coarse_to_fine: bool = True
    window_radius: int = 4
    flip: str = "off"
    flip_margin: float = 0.02
    scale: str = "off"
    scale_rho: float = 0.1
    window: int = 3

    DOMAIN: ClassVar[dict[str, Rule]] = {
        "eps": ENTROPY,
        "w_s": NON_NEGATIVE,
        "k": (POSITIVE_ODD[0], "must be a positive odd neighbourhood size"),
        "k_trg": (POSITIVE_ODD[0], "must be a positive odd neighbourhood size (none: k)"),
        "w_y": NON_NEGATIVE,
        "rho": (lambda value: value > 0, "must be > 0 (inf: hard marginals)"),
        "outer_iters": AT_LEAST_ONE,
        "inner_iters": AT_LEAST_ONE,
        "outer_tol": NON_NEGATIVE,
        "inner_tol": NON_NEGATIVE,
        "coarse_to_fine": (lambda value: isinstance(value, bool), "must be true or false"),
        "window_radius": (AT_LEAST_ONE[0], "must be >= 1 (target patches around the coarse match)"),
        "flip": (lambda value: value in ("off", "auto"), "must be off or auto"),
        "flip_margin": NON_NEGATIVE,
        "scale": (lambda value: value in ("off", "auto"), "must be off or auto"),
        "scale_rho": (lambda value: value > 0, "must be > 0 (inf: hard marginals)"),
        "window": PATCH_WINDOW,
    }

    def solver_kwargs(self) -> dict[str, Any]:
        """The parameters :func:`stages.match.robust.robust_gwot` takes (all but the readout's)."""
        return {name: value for name, value in asdict(self).items() if name != "window"}

    @property
    def needs_flipped(self) -> bool:
        """Whether the setting reads the mirrored images' features (a backbone with ``flip: true``)."""
        return self.flip != "off"


PARAMS: dict[str, type[NNParams] | type[GWOTParams]] = {"nn": NNParams, "gwot": GWOTParams}
Params = NNParams | GWOTParams


def format_value(value: Any) -> str:
    """A parameter value as labels and messages show it (``0.02``, ``3``, ``inf``, ``true``)."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def domain_problem(cls: type[NNParams] | type[GWOTParams], key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for parameter ``key`` (``"must be a finite number > 0, got -1.0"``), or None.

    None passes (only an optional field, typed ``X | None``, can hold it). Every field has a rule (a test
    holds the classes to it).
    """
    if value is None:
        return None
    accepts, requirement = cls.DOMAIN[key]
    return None if accepts(value) else f"{requirement}, got {format_value(value)}"


def parse_params(spec: MatcherSpec, overrides: Mapping[str, Any] | None = None, where: str | None = None) -> Params:
    """The typed, checked parameters of a catalog matcher with ``overrides`` applied.

    Raises CatalogError naming ``<where>.<key>`` (default ``matchers.<name>.params.<key>``) for an
    unknown key (listing the valid ones), a value of the wrong type or one outside the method's domain.
    """
    where = where or f"matchers.{spec.name}.params"
    cls = PARAMS[spec.method]
    params = from_mapping(cls, {**spec.params, **(overrides or {})}, where)
    for key, value in asdict(params).items():
        problem = domain_problem(cls, key, value)
        if problem:
            raise CatalogError(f"{where}.{key}: {problem}")
    return params


def _parse_value(hint: Any, text: str, where: str) -> Any:
    """A ``--set`` value as the field's type: numbers (``inf``/``.inf`` too for floats), ``true``/``false``,
    ``none`` for an optional field, text as it is (a mode such as ``auto``; its domain rule checks it)."""
    text = text.strip()
    options = typing.get_args(hint)
    if type(None) in options:
        if text.lower() in ("none", "null"):
            return None
        (hint,) = (option for option in options if option is not type(None))
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

    Raises CatalogError naming the ``--set`` for a malformed one, an unknown matcher or key, a value of the
    wrong type or outside the parameter's domain, or a key set twice.
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
        typed = tuple(_parse_value(hint, value, f"{where} ({name}.{key})") for value in values.split(","))
        for value in typed:
            problem = domain_problem(cls, key, value)
            if problem:
                raise CatalogError(f"{where}: {name}.{key} {problem}")
        parsed.setdefault(name, {})[key] = typed
    return parsed


def check_matchers(catalog: Catalog) -> None:
    """Check every catalog matcher's parameters (CatalogError naming the catalog file and
    ``matchers.<name>.params.<key>``)."""
    for spec in catalog.matchers.values():
        try:
            parse_params(spec)
        except CatalogError as error:
            raise CatalogError(f"{catalog.path}: {error}") from None


def select_sweeps(
    catalog: Catalog, names: Sequence[str], overrides: Sequence[str]
) -> tuple[list[MatcherSpec], dict[str, dict[str, tuple[Any, ...]]]]:
    """The catalog matchers named (all when ``names`` is empty) and their ``--set`` sweeps, checked.

    Raises CatalogError for an unknown matcher, a bad ``--set`` (see :func:`parse_overrides`) or one
    naming a matcher that is not selected. The command line calls it before any stage starts.
    """
    names = tuple(dict.fromkeys(names)) or tuple(catalog.matchers)
    specs = [catalog.matcher(name) for name in names]
    sweeps = parse_overrides(catalog, overrides)
    unselected = sorted(set(sweeps) - set(names))
    if unselected:
        raise CatalogError(
            f"--set names matcher(s) {', '.join(unselected)} that are not selected (--matcher {' '.join(names)})"
        )
    return specs, sweeps
