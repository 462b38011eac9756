"""The data catalog: load ``catalog.yaml`` into frozen, validated objects; every name used anywhere lives here."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline import registry
from pipeline.config import convert, from_mapping
from pipeline.errors import CatalogError

ENV_OVERRIDES = {
    "data_root": "PIPELINE_DATA_ROOT",
    "cache_root": "PIPELINE_CACHE_ROOT",
    "outputs": "PIPELINE_OUTPUTS",
}
DEFAULT_CATALOG = "catalog.yaml"
REPO_CATALOG = Path(__file__).resolve().parents[1] / DEFAULT_CATALOG  # the catalog shipped with the project


@dataclass(frozen=True)
class Source:
    """One file of a dataset: where to fetch it, how to check it, and whether to extract it."""

    url: str
    filename: str
    size: int | None = None
    sha256: str | None = None
    mirrors: tuple[str, ...] = ()
    extract: bool = True
    max_ratio: float | None = None  # extraction refuses more than this times the archive's size (default 100)
    max_extracted_bytes: int | None = None  # ... or more than this in all (default 200 GiB)
    read_timeout: float = 60.0  # seconds without a byte before a transfer is resumed from where it stopped


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: its normaliser (``kind``), its source files, the splits kept, and kind-specific options."""

    name: str
    kind: str
    sources: tuple[Source, ...] = ()
    splits: tuple[str, ...] = ("test",)
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stores:
    """Roots of the stores: local folders, relative ones resolved against the catalog's folder."""

    data_root: str = "data"
    cache_root: str = "cache"
    outputs: str = "outputs"


@dataclass(frozen=True)
class BackboneSpec:
    """A feature extractor: a timm model name (or ``daisy``) and everything that changes its numbers."""

    name: str
    model: str
    weights: str = "hub"  # hub | random | random:<seed> | none (daisy) | path to a weights file
    image_size: int = 840
    layer: Literal["prenorm", "norm"] = "prenorm"
    pos_embed: Literal["dinov2", "timm"] = "dinov2"  # position embedding resampling: the original DINOv2's or timm's
    flip: bool = False
    dtype: Literal["float16"] = "float16"
    batch_size: int = 8


@dataclass(frozen=True)
class MatcherSpec:
    """A named matcher setting: the method and its parameters (checked by the stages' run check before any stage
    starts; the pipeline knows no method's parameters)."""

    name: str
    method: Literal["nn", "gwot"]
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterSpec:
    """Where Dask work runs: an existing scheduler's address, or a local cluster of ``n_workers``."""

    address: str | None = None
    n_workers: int | None = None
    threads_per_worker: int = 1
    processes: bool = True
    connect_timeout: float = 10.0  # seconds to reach an existing scheduler
    worker_wait: float = 30.0  # seconds to wait for an existing scheduler's first worker


@dataclass(frozen=True)
class EvaluationSpec:
    """How results are scored: the PCK alphas."""

    alphas: tuple[float, ...] = (0.01, 0.05, 0.1, 0.15)


@dataclass(frozen=True)
class Catalog:
    """The whole catalog, with store roots already resolved to absolute paths or URLs."""

    path: str
    stores: Stores
    datasets: Mapping[str, DatasetSpec]
    backbones: Mapping[str, BackboneSpec]
    matchers: Mapping[str, MatcherSpec]
    cluster: ClusterSpec
    evaluation: EvaluationSpec
    default_backbone: str | None = None

    def dataset(self, name: str) -> DatasetSpec:
        """The dataset called ``name``; an unknown name is an error listing the known ones."""
        return _lookup(self.datasets, name, "dataset")

    def backbone(self, name: str) -> BackboneSpec:
        """The backbone called ``name``."""
        return _lookup(self.backbones, name, "backbone")

    def matcher(self, name: str) -> MatcherSpec:
        """The matcher setting called ``name``."""
        return _lookup(self.matchers, name, "matcher")

    def raw_dir(self, dataset: str) -> Path:
        """Where the download stage puts ``dataset``'s files: ``<data_root>/raw/<dataset>``."""
        return Path(self.stores.data_root) / "raw" / dataset

    def normalized_dir(self, dataset: str) -> Path:
        """Where the normalize stage writes ``images.parquet`` and ``pairs.parquet`` for ``dataset``."""
        return Path(self.stores.data_root) / "normalized" / dataset


def _lookup(table: Mapping[str, Any], name: str, what: str) -> Any:
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise CatalogError(f"unknown {what} {name!r}; the catalog defines: {known}")
    return table[name]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key repeated in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate name {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_TOP_LEVEL = ("stores", "datasets", "backbones", "matchers", "cluster", "evaluation", "default_backbone")


def load_catalog(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Catalog:
    """Read and validate the catalog at ``path`` (default ``./catalog.yaml``); roots from ``PIPELINE_*`` win.

    Raises CatalogError naming the key and the problem for an unknown key, a missing field, a wrong type
    or an unknown dataset kind.
    """
    path = Path(path or DEFAULT_CATALOG)
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the catalog ({exc.strerror}); pass --catalog PATH") from exc
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return _parse(raw, path.resolve(), environ)
    except CatalogError as exc:
        raise CatalogError(f"{path}: {exc}") from None


def _parse(raw: Any, path: Path, environ: Mapping[str, str]) -> Catalog:
    if not isinstance(raw, Mapping):
        raise CatalogError(f"expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise CatalogError(f"unknown top-level key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(_TOP_LEVEL)}")
    stores = from_mapping(Stores, raw.get("stores") or {}, "stores")
    roots = {}
    for key, env in ENV_OVERRIDES.items():
        value = environ.get(env) or getattr(stores, key)
        roots[key] = value if "://" in value else str((path.parent / value).resolve())
    datasets = _named(DatasetSpec, raw.get("datasets") or {}, "datasets")
    kinds = registry.dataset_kinds()
    for name, spec in datasets.items():
        if spec.kind not in kinds:
            raise CatalogError(f"datasets.{name}.kind: unknown dataset kind {spec.kind!r}; valid: {', '.join(kinds)}")
    backbones = {
        name: _resolve_weights(spec, path.parent)
        for name, spec in _named(BackboneSpec, raw.get("backbones") or {}, "backbones").items()
    }
    default_backbone = convert(str | None, raw.get("default_backbone"), "default_backbone")
    if default_backbone is not None and default_backbone not in backbones:
        raise CatalogError(f"default_backbone: {default_backbone!r} is not one of {', '.join(sorted(backbones))}")
    return Catalog(
        path=str(path),
        stores=Stores(**roots),
        datasets=datasets,
        backbones=backbones,
        matchers=_named(MatcherSpec, raw.get("matchers") or {}, "matchers"),
        cluster=from_mapping(ClusterSpec, raw.get("cluster") or {}, "cluster"),
        evaluation=from_mapping(EvaluationSpec, raw.get("evaluation") or {}, "evaluation"),
        default_backbone=default_backbone,
    )


WEIGHTS_KEYWORDS = ("hub", "random", "none")


def _resolve_weights(spec: BackboneSpec, folder: Path) -> BackboneSpec:
    """A weights file given by a relative path is relative to the catalog's folder, not the working directory."""
    if spec.weights.split(":")[0] in WEIGHTS_KEYWORDS or Path(spec.weights).is_absolute():
        return spec
    return dataclasses.replace(spec, weights=str((folder / spec.weights).resolve()))


def _named(cls: type, table: Any, where: str) -> dict[str, Any]:
    """Parse a ``name: {fields}`` mapping into ``{name: cls(name=name, ...)}``."""
    if not isinstance(table, Mapping):
        raise CatalogError(f"{where}: expected a mapping of names, got {type(table).__name__}")
    out = {}
    for name, body in table.items():
        if not isinstance(name, str):
            raise CatalogError(f"{where}: names must be strings, got {name!r}")
        if not isinstance(body, Mapping):
            raise CatalogError(f"{where}.{name}: expected a mapping, got {type(body).__name__} {body!r}")
        if "name" in body:
            raise CatalogError(f"{where}.{name}: 'name' is given by the key and must not be repeated")
        out[name] = from_mapping(cls, {"name": name, **body}, f"{where}.{name}")
    return out
