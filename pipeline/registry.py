"""What the stages add to the pipeline, by module path: stages, dataset kinds, generated sources, commands, API.

``pipeline`` imports nothing from the stages. The stages package registers itself here when it is imported
(:data:`PLUGIN_PACKAGE`, the one name of the layer above that ``pipeline`` knows), naming modules by their
path so that reading the registry (``pipeline --help``, loading a catalog) imports none of them: a module is
imported only when its stage runs or its command is called.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pipeline.errors import CatalogError

PLUGIN_PACKAGE = "stages"  # imported once, on first use; its __init__ calls the register_* functions below


@dataclass(frozen=True)
class StageEntry:
    """A stage: its module (``run(ctx)``, ``status(ctx, dataset)``), what ``pipeline run`` prints after it, and
    where its status is read from when that is a lighter module than the stage's own."""

    name: str
    module: str
    announce: str | None = None  # "module:function": (catalog, run_name) -> a line printed after `pipeline run`
    status: str | None = None  # "module:function": (ctx, dataset) -> StageStatus; default: the module's status


_STAGES: dict[str, StageEntry] = {}  # in the order a full run executes them
_DATASET_KINDS: dict[str, str] = {}  # kind -> module with normalize(raw_dir, spec, report)
_SOURCES: dict[str, str] = {}  # kind -> module with materialize(raw_dir, spec), for datasets without sources
_COMMANDS: dict[str, str] = {}  # command name -> "module:attribute" of a click command
_CHECKS: list[str] = []  # "module:function": (catalog, options) -> None, run before `pipeline run` starts
_API: dict[str, str] = {}  # notebook API name -> module defining it
_loaded = False


def register_stage(name: str, module: str, announce: str | None = None, status: str | None = None) -> None:
    """Add stage ``name`` after those registered before it; ``status`` names a status function that imports
    less than the stage (``pipeline status`` answers at once)."""
    _STAGES[name] = StageEntry(name, module, announce, status)


def register_dataset_kind(kind: str, module: str, source: str | None = None) -> None:
    """Add dataset ``kind``, normalised by ``module``; ``source`` generates the raw files of a sourceless one."""
    _DATASET_KINDS[kind] = module
    if source is not None:
        _SOURCES[kind] = source


def register_command(name: str, target: str) -> None:
    """Add the click command at ``target`` (``"module:attribute"``) to ``pipeline`` as ``name``."""
    _COMMANDS[name] = target


def register_run_check(target: str) -> None:
    """Run ``target(catalog, options)`` (``"module:function"``) before ``pipeline run`` starts any stage."""
    if target not in _CHECKS:
        _CHECKS.append(target)


def register_api(module: str, names: tuple[str, ...]) -> None:
    """Export ``names`` of ``module`` as ``pipeline.<name>`` (the notebook API), imported on first use."""
    _API.update(dict.fromkeys(names, module))


def _load() -> None:
    global _loaded
    if not _loaded:
        importlib.import_module(PLUGIN_PACKAGE)
        _loaded = True


def resolve(target: str) -> Any:
    """The object at ``"module:attribute"`` (or the module itself, given a plain module path)."""
    module, _, attribute = target.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


def stages() -> dict[str, StageEntry]:
    """The registered stages by name, in run order."""
    _load()
    return dict(_STAGES)


def stage_module(name: str) -> ModuleType:
    """The module implementing stage ``name``."""
    entries = stages()
    if name not in entries:
        raise CatalogError(f"unknown stage {name!r}; valid stages: {', '.join(entries)}")
    return resolve(entries[name].module)


def stage_status(name: str) -> Any:
    """The function ``(ctx, dataset) -> StageStatus`` of stage ``name``."""
    entry = stages().get(name)
    if entry is None or entry.status is None:
        return stage_module(name).status
    return resolve(entry.status)


def dataset_kinds() -> tuple[str, ...]:
    """The registered dataset kinds, sorted."""
    _load()
    return tuple(sorted(_DATASET_KINDS))


def dataset_module(kind: str) -> ModuleType:
    """The module that normalises datasets of ``kind`` (it defines ``normalize(raw_dir, spec, report)``)."""
    _load()
    if kind not in _DATASET_KINDS:
        raise CatalogError(f"unknown dataset kind {kind!r}; valid: {', '.join(dataset_kinds())}")
    return resolve(_DATASET_KINDS[kind])


def source_module(kind: str) -> ModuleType:
    """The module generating the raw files of a sourceless dataset of ``kind`` (``materialize(raw_dir, spec)``)."""
    _load()
    if kind not in _SOURCES:
        raise CatalogError(f"dataset kind {kind!r} has no sources and no generator; give it sources in the catalog")
    return resolve(_SOURCES[kind])


def commands() -> dict[str, str]:
    """The registered commands: name -> ``"module:attribute"``."""
    _load()
    return dict(_COMMANDS)


def run_checks() -> tuple[str, ...]:
    """The checks to run before ``pipeline run`` starts."""
    _load()
    return tuple(_CHECKS)


def api_module(name: str) -> str | None:
    """The module defining notebook API name ``name``, or None when it is not one."""
    _load()
    return _API.get(name)


def api_names() -> tuple[str, ...]:
    """Every notebook API name."""
    _load()
    return tuple(_API)
