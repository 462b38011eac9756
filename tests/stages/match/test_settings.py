"""Matcher settings: strict parameters, ``--set`` sweeps expanded into grids, stable and distinct keys."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import math
from pathlib import Path

import pytest

from pipeline.catalog import REPO_CATALOG, load_catalog
from pipeline.errors import CatalogError, PipelineError
from stages.match import settings
from stages.match.gwot import gwot
from stages.match.robust import robust_gwot
from stages.match.settings import GWOTParams, NNParams, parse_params, resolve_settings
from stages.matcher_params import domain_problem

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
    keywords.pop("warn")  # the stage records convergence per pair and never warns
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
        match=r"matchers\.typo\.params: unknown key\(s\) 'epsilon'; valid keys are coarse_to_fine, eps, flip,",
    ):
        parse_params(bad.matcher("typo"))
    wrong = catalog_with(tmp_path, CATALOG + "  wrong: {method: gwot, params: {k: 2.5}}\n")
    with pytest.raises(CatalogError, match=r"matchers\.wrong\.params\.k: expected an integer, got float 2\.5"):
        parse_params(wrong.matcher("wrong"))
    outside = catalog_with(tmp_path, CATALOG + "  outside: {method: gwot, params: {eps: -1.0}}\n")
    with pytest.raises(
        CatalogError, match=r"matchers\.outside\.params\.eps: must be a finite number >= 0\.0001 .*, got -1\.0"
    ):
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
        '{"backbone":"store-a","implementation":4,"method":"gwot","params":{"coarse_to_fine":true,"eps":0.02,'
        '"flip":"off","flip_margin":0.02,"inner_iters":50,"inner_tol":0.0001,"k":5,"k_trg":null,"outer_iters":10,'
        '"outer_tol":0.001,"rho":1.0,"scale":"off","scale_rho":0.1,"w_s":0.1,"w_y":0.1,"window":3,'
        '"window_radius":4}}'
    )
    assert default.key == hashlib.sha256(canonical.encode()).hexdigest()[:12]
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
        ("gwot.eps=0.1,0", r"--set gwot.eps=0.1,0: gwot\.eps must be a finite number >= 0\.0001 .*, got 0\.0"),
        ("gwot.k=4", r"--set gwot.k=4: gwot\.k must be a positive odd neighbourhood size, got 4"),
        ("nn.window=0", r"--set nn.window=0: nn\.window must be a positive odd number of patches, got 0"),
        ("gwot.w_s=inf", r"--set gwot.w_s=inf: gwot\.w_s must be a finite number >= 0, got inf"),
        ("gwot.eps=inf", r"--set gwot.eps=inf: gwot\.eps must be a finite number >= 0\.0001 .*, got inf"),
        ("gwot.eps=nan", r"--set gwot.eps=nan: gwot\.eps must be a finite number >= 0\.0001 .*, got nan"),
        ("gwot.eps=1e-30", r"--set gwot.eps=1e-30: gwot\.eps must be a finite number >= 0\.0001 .*, got 1e-30"),
        ("nn.temperature=inf", r"--set nn.temperature=inf: nn\.temperature must be a finite number > 0, got inf"),
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


@pytest.mark.parametrize(
    ("key", "refused"),
    [("eps", 0.0), ("eps", -1.0), ("w_s", -0.1), ("w_y", -1e-9), ("k", 4), ("k", 0), ("k", -1), ("rho", 0.0),
     ("rho", -math.inf), ("outer_iters", 0), ("inner_iters", 0), ("eps", math.nan), ("flip", "yes"),
     ("scale", "on"), ("flip_margin", -0.1), ("scale_rho", 0.0), ("window_radius", 0)],
)  # fmt: skip
def test_every_value_the_solver_refuses_is_refused_when_read(key, refused):
    import torch

    one_patch = torch.ones(1, 1, 1, 1)
    solve = functools.partial(robust_gwot, one_patch, one_patch, src_flipped=one_patch)
    with pytest.raises(PipelineError, match="invalid GWOT settings"):  # the oracle: the solver's own check
        solve(**(GWOTParams().solver_kwargs() | {key: refused}))
    assert domain_problem(GWOTParams, key, refused) is not None
    assert domain_problem(GWOTParams, key, getattr(GWOTParams(), key)) is None
    solve(**GWOTParams().solver_kwargs())  # the defaults pass both


def test_a_new_implementation_version_makes_new_setting_keys(tmp_path, monkeypatch):
    catalog = catalog_with(tmp_path)
    before = {s.label: s.key for s in resolve_settings(catalog, [], [], "store-a")}
    monkeypatch.setitem(settings.IMPLEMENTATION_VERSIONS, "gwot", settings.IMPLEMENTATION_VERSIONS["gwot"] + 1)
    after = {s.label: s.key for s in resolve_settings(catalog, [], [], "store-a")}
    assert after["nn"] == before["nn"]  # only the changed method's results are redone
    assert after["gwot"] != before["gwot"] and after["balanced"] != before["balanced"]
    (gwot_setting,) = resolve_settings(catalog, ["gwot"], [], "store-a")
    assert gwot_setting.describe()["implementation"] == settings.IMPLEMENTATION_VERSIONS["gwot"]


def test_every_parameter_has_a_domain_rule():
    for cls in (NNParams, GWOTParams):
        assert set(cls.DOMAIN) == {f.name for f in dataclasses.fields(cls)}, f"add a DOMAIN rule to {cls.__name__}"
