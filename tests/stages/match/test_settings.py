"""Matcher settings: strict parameters, ``--set`` sweeps expanded into grids, stable and distinct keys."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
from pathlib import Path

import pytest

from pipeline.catalog import REPO_CATALOG, load_catalog
from pipeline.errors import CatalogError
from stages.match import gwot
from stages.match.robust import robust_gwot
from stages.match.settings import GWOTParams, NNParams, parse_params, resolve_settings

CATALOG = """
stores: {data_root: d, cache_root: c, outputs: o}
matchers:
  nn: {method: nn}
  gwot: {method: gwot}
  balanced: {method: gwot, params: {rho: .inf, w_y: 0.0}}
"""


def catalog_with(tmp_path: Path, text: str = CATALOG):
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return load_catalog(path, environ={})


def test_gwot_params_mirror_the_solver_signature():
    keywords = {
        name: p.default
        for solver in (gwot, robust_gwot)
        for name, p in inspect.signature(solver).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }
    keywords.pop("init")  # a warm start is per problem, not a setting
    keywords.pop("src_flipped")  # features, not a setting
    params = GWOTParams()
    assert params.solver_kwargs() == keywords
    assert {f.name for f in dataclasses.fields(GWOTParams)} == {*keywords, "window"}


def test_the_shipped_matchers_parse():
    shipped = load_catalog(REPO_CATALOG, environ={})
    params = {name: parse_params(spec) for name, spec in shipped.matchers.items()}
    assert params["gwot"] == GWOTParams() and params["entropic-ot"] == GWOTParams(w_s=0.0, w_y=0.0)


def test_catalog_params_parse_strictly_with_inf(tmp_path):
    catalog = catalog_with(tmp_path)
    balanced = parse_params(catalog.matcher("balanced"))
    assert balanced == GWOTParams(rho=math.inf, w_y=0.0)
    assert parse_params(catalog.matcher("nn")) == NNParams()

    bad = catalog_with(tmp_path, CATALOG + "  typo: {method: gwot, params: {epsilon: 0.1}}\n")
    with pytest.raises(
        CatalogError,
        match=r"matchers\.typo\.params: unknown key\(s\) 'epsilon'; valid keys are eps, flip, flip_margin, inner_iters",
    ):
        parse_params(bad.matcher("typo"))
    wrong = catalog_with(tmp_path, CATALOG + "  wrong: {method: gwot, params: {k: 2.5}}\n")
    with pytest.raises(CatalogError, match=r"matchers\.wrong\.params\.k: expected an integer, got float 2\.5"):
        parse_params(wrong.matcher("wrong"))
    outside = catalog_with(tmp_path, CATALOG + "  outside: {method: gwot, params: {eps: -1.0}}\n")
    with pytest.raises(CatalogError, match=r"matchers\.outside\.params: invalid GWOT settings: eps must be > 0"):
        parse_params(outside.matcher("outside"))
    even = catalog_with(tmp_path, CATALOG + "  even: {method: nn, params: {window: 4}}\n")
    with pytest.raises(CatalogError, match=r"matchers\.even\.params\.window: must be a positive odd number"):
        parse_params(even.matcher("even"))


def test_set_expands_into_the_grid_of_its_values(tmp_path):
    catalog = catalog_with(tmp_path)
    settings = resolve_settings(catalog, ["gwot", "nn"], ["gwot.eps=0.02,0.05", "gwot.k=3,5"], "store-a")
    labels = [s.label for s in settings]
    assert labels == ["gwot[eps=0.02,k=3]", "gwot[eps=0.02,k=5]", "gwot[eps=0.05,k=3]", "gwot[eps=0.05,k=5]", "nn"]
    assert settings[1].params == GWOTParams(eps=0.02, k=5)
    assert len({s.key for s in settings}) == 5
    everything = resolve_settings(catalog, [], [], "store-a")
    assert [s.label for s in everything] == ["nn", "gwot", "balanced"]
    inf = resolve_settings(catalog, ["gwot"], ["gwot.rho=inf,.inf,1"], "store-a")
    assert [s.label for s in inf] == ["gwot[rho=inf]", "gwot[rho=1.0]"]  # equal settings are run once


def test_keys_are_stable_and_change_with_every_ingredient(tmp_path):
    catalog = catalog_with(tmp_path)
    (default,) = resolve_settings(catalog, ["gwot"], [], "store-a")
    canonical = (
        '{"backbone":"store-a","method":"gwot","params":{"eps":0.02,"flip":"off","flip_margin":0.02,'
        '"inner_iters":50,"inner_tol":0.0001,"k":5,"k_trg":null,"outer_iters":10,"outer_tol":0.001,"rho":1.0,'
        '"scale":"off","scale_rho":0.1,"w_s":0.1,"w_y":0.1,"window":3}}'
    )
    assert default.key == hashlib.sha256(canonical.encode()).hexdigest()[:12] == "41241215be82"
    assert default.label == "gwot"
    (other_store,) = resolve_settings(catalog, ["gwot"], [], "store-b")
    (changed,) = resolve_settings(catalog, ["gwot"], ["gwot.outer_iters=11"], "store-a")
    (same,) = resolve_settings(catalog, ["gwot"], ["gwot.eps=0.02"], "store-a")
    (nn,) = resolve_settings(catalog, ["nn"], [], "store-a")
    assert len({default.key, other_store.key, changed.key, nn.key}) == 4
    assert same.key == default.key and same.label == "gwot[eps=0.02]"
    (balanced,) = resolve_settings(catalog, ["balanced"], [], "store-a")
    (swept,) = resolve_settings(catalog, ["gwot"], ["gwot.rho=inf", "gwot.w_y=0"], "store-a")
    assert balanced.key == swept.key  # the key is the parameters', not the name's


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nope.eps=1", r"--set nope.eps=1: unknown matcher 'nope'; the catalog defines: balanced, gwot, nn"),
        (
            "gwot.epsilon=1",
            r"--set gwot.epsilon=1: unknown key 'epsilon' of matcher 'gwot' \(method gwot\); valid keys",
        ),
        ("gwot.k=3.5", r"--set gwot.k=3.5 \(gwot.k\): expected an integer, got '3.5'"),
        ("nn.temperature=warm", r"\(nn.temperature\): expected a number \(inf allowed\), got 'warm'"),
        ("gwot.eps=0", r"matchers\.gwot\.params: invalid GWOT settings: eps must be > 0, got 0.0"),
        ("gwot=0.1", r"--set gwot=0.1: expected MATCHER.KEY=VALUE\[,VALUE...\]"),
        ("gwot.eps=", r"expected MATCHER.KEY=VALUE"),
    ],
)
def test_bad_overrides_are_named(tmp_path, override, message):
    with pytest.raises(CatalogError, match=message):
        resolve_settings(catalog_with(tmp_path), ["gwot", "nn"], [override], "store-a")


def test_an_optional_parameter_takes_a_value_or_none(tmp_path):
    settings = resolve_settings(catalog_with(tmp_path), ["gwot"], ["gwot.k_trg=7,none"], "store-a")
    assert [s.params.k_trg for s in settings] == [7, None]
    assert [s.label for s in settings] == ["gwot[k_trg=7]", "gwot[k_trg=None]"]
    with pytest.raises(CatalogError, match=r"\(gwot.k_trg\): expected an integer, got 'big'"):
        resolve_settings(catalog_with(tmp_path), ["gwot"], ["gwot.k_trg=big"], "store-a")
    with pytest.raises(CatalogError, match=r"k_trg must be a positive odd neighbourhood size"):
        resolve_settings(catalog_with(tmp_path), ["gwot"], ["gwot.k_trg=4"], "store-a")


def test_an_override_of_an_unselected_or_twice_set_key_is_refused(tmp_path):
    catalog = catalog_with(tmp_path)
    with pytest.raises(CatalogError, match=r"--set names matcher\(s\) gwot that are not selected \(--matcher nn\)"):
        resolve_settings(catalog, ["nn"], ["gwot.eps=0.1"], "store-a")
    with pytest.raises(CatalogError, match=r"gwot\.eps is set twice; list all its values in one --set"):
        resolve_settings(catalog, ["gwot"], ["gwot.eps=0.1", "gwot.eps=0.2"], "store-a")
