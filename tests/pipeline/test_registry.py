"""The registry the stages fill: run order, dataset kinds, the demo's generator, commands, the notebook API."""

from __future__ import annotations

import click
import pytest

from pipeline import registry
from pipeline.errors import CatalogError


def test_stages_register_in_run_order_and_resolve_to_their_entries():
    assert list(registry.stages()) == ["download", "normalize", "features", "match", "report"]
    module = registry.stage_module("download")
    assert module.__name__ == "stages.download.stage" and callable(module.run) and callable(module.status)
    with pytest.raises(CatalogError, match=r"unknown stage 'nope'; valid stages: download, normalize, features"):
        registry.stage_module("nope")


def test_dataset_kinds_and_the_generated_source():
    assert registry.dataset_kinds() == ("demo", "pf-pascal", "pf-willow", "spair", "tss")
    assert callable(registry.dataset_module("tss").normalize)
    assert callable(registry.source_module("demo").materialize)
    with pytest.raises(CatalogError, match="dataset kind 'tss' has no sources and no generator"):
        registry.source_module("tss")
    with pytest.raises(CatalogError, match="unknown dataset kind 'voc'; valid: demo, pf-pascal"):
        registry.dataset_module("voc")


def test_registered_commands_are_click_commands_of_their_name():
    for name, target in registry.commands().items():
        command = registry.resolve(target)
        assert isinstance(command, click.Command) and command.name == name
    assert set(registry.commands()) == {"list", "report", "export-tss", "score-tss", "match-pair"}
    assert registry.api_module("match_images") == "stages.api" and registry.api_module("nope") is None
