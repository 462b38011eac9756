"""``pipeline list``: the catalog's datasets, backbones and matchers (parameters and defaults) and the runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.catalog import BackboneSpec, Catalog
from pipeline.errors import CatalogError

SECTIONS = ("datasets", "backbones", "matchers", "runs")


def _settings(values: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={_text(value)}" for key, value in values.items()) or "-"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(map(_text, value))
    return str(value)


def _table(rows: list[tuple[str, ...]]) -> Iterator[str]:
    """Rows as left-aligned columns (the last column as it is)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)] if rows else []
    for row in rows:
        yield "  " + "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])


def dataset_lines(catalog: Catalog) -> Iterator[str]:
    """One line per catalog dataset: name, kind, splits, options and source files."""
    rows = [
        (
            name,
            spec.kind,
            f"splits={_text(spec.splits)}",
            f"options: {_settings(spec.options)}; files: {', '.join(s.filename for s in spec.sources) or '-'}",
        )
        for name, spec in catalog.datasets.items()
    ]
    yield f"datasets ({len(rows)}):"
    yield from _table(rows)


def backbone_lines(catalog: Catalog) -> Iterator[str]:
    """One line per catalog backbone with every setting (``*``: the default backbone)."""
    from stages.features.backbone_keys import DINOV2_MODELS

    fields = [field.name for field in dataclasses.fields(BackboneSpec) if field.name not in ("name", "model")]
    rows = [
        (
            name + ("*" if name == catalog.default_backbone else ""),
            spec.model,
            _settings({field: getattr(spec, field) for field in fields}),
        )
        for name, spec in catalog.backbones.items()
    ]
    yield f"backbones ({len(rows)}; * default):"
    yield from _table(rows)
    yield "  `model` is daisy or any timm ViT name; pos_embed: dinov2 (the original DINOv2 resampling) is for"
    yield f"  DINOv2 models ({', '.join(DINOV2_MODELS[:2])}, ...), pos_embed: timm for any other ViT."


def matcher_lines(catalog: Catalog) -> Iterator[str]:
    """One line per catalog matcher: every parameter's value, ``(default X)`` where the catalog changes it."""
    from stages.matcher_params import PARAMS, parse_params

    rows = []
    for name, spec in catalog.matchers.items():
        try:
            params = dataclasses.asdict(parse_params(spec))
        except CatalogError as error:
            rows.append((name, spec.method, f"INVALID: {error}"))
            continue
        defaults = dataclasses.asdict(PARAMS[spec.method]())
        shown = {
            key: _text(value) + ("" if value == defaults[key] else f" (default {_text(defaults[key])})")
            for key, value in params.items()
        }
        rows.append((name, spec.method, _settings(shown)))
    yield f"matchers ({len(rows)}):"
    yield from _table(rows)


def run_lines(catalog: Catalog) -> Iterator[str]:
    """One line per run folder under the outputs store: its datasets and how many matcher settings."""
    from pipeline import results  # imports pyarrow: only for this section

    outputs = Path(catalog.stores.outputs)
    runs = sorted(p for p in outputs.iterdir() if (p / "config.json").is_file()) if outputs.is_dir() else []
    rows = []
    for run in runs:
        datasets = sorted(p.name.removeprefix("dataset=") for p in (run / "pairs").glob("dataset=*"))
        settings = {p.name for p in (run / "pairs").glob("dataset=*/matcher=*/setting=*")}
        summary = "summary.md" if (run / "summary.md").is_file() else "no summary yet"
        try:
            results.check_layout(run)
        except results.OldLayoutError:
            summary = "results of an older layout: re-run its match stage into a new run"
        rows.append((run.name, f"datasets: {', '.join(datasets) or '-'}", f"{len(settings)} setting(s); {summary}"))
    yield f"runs in {outputs} ({len(rows)}):"
    yield from _table(rows)


LINES = {"datasets": dataset_lines, "backbones": backbone_lines, "matchers": matcher_lines, "runs": run_lines}


def listing(catalog: Catalog, sections: tuple[str, ...] = ()) -> Iterator[str]:
    """The lines of ``pipeline list`` for ``sections`` (all when empty), a blank line between sections."""
    for index, section in enumerate(sections or SECTIONS):
        if index:
            yield ""
        yield from LINES[section](catalog)
