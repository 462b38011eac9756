"""The match stage with flip- and scale-aware GWOT: the backbone setting it needs, and its pairs-table columns."""

from __future__ import annotations

import pytest
import yaml

from pipeline import results
from pipeline.catalog import load_catalog
from pipeline.context import RunOptions, StageContext
from pipeline.errors import StageError
from pipeline.runner import run_stages
from stages.match import stage

CATALOG = {
    "stores": {"data_root": "data", "cache_root": "cache", "outputs": "outputs"},
    "datasets": {"demo": {"kind": "demo", "options": {"n_pairs": 4, "max_side": 96, "n_keypoints": 5}}},
    "backbones": {
        "daisy": {"model": "daisy", "weights": "none", "image_size": 112},
        "daisy-flip": {"model": "daisy", "weights": "none", "image_size": 112, "flip": True},
    },
    "default_backbone": "daisy",
    "matchers": {
        "nn": {"method": "nn"},
        "gwot-robust": {"method": "gwot", "params": {"flip": "auto", "scale": "auto", "outer_iters": 3}},
    },
    "cluster": {"n_workers": 1, "processes": False},
}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """The 4-pair demo (normal, smaller, larger, mirrored) with DAISY features with and without flips."""
    folder = tmp_path_factory.mktemp("robust")
    (folder / "catalog.yaml").write_text(yaml.safe_dump(CATALOG))
    catalog = load_catalog(folder / "catalog.yaml", environ={})
    run_stages(catalog, ["download", "normalize"], ["demo"], RunOptions(progress=False))
    for backbone in ("daisy", "daisy-flip"):
        run_stages(catalog, ["features"], ["demo"], RunOptions(progress=False, backbone=backbone))
    return catalog


def test_a_flip_aware_matcher_names_the_backbone_setting_it_needs(catalog):
    options = RunOptions(progress=False, backbone="daisy", matchers=("gwot-robust",), run_name="no-flips")
    with pytest.raises(
        StageError,
        match=r"gwot-robust \(flip: auto\) read the mirrored images' features.*"
        r"set `flip: true` on backbone 'daisy'.*\(backbones\.daisy\.flip\)",
    ):
        stage.run(StageContext(catalog, ("demo",), options))


def test_the_pairs_table_records_variant_orientation_objectives_and_scale(catalog):
    options = RunOptions(progress=False, backbone="daisy-flip", run_name="robust")
    stage.run(StageContext(catalog, ("demo",), options))
    pairs = results.read_results(results.run_dir(catalog.stores.outputs, "robust"), "pairs").sort_values("pair_id")
    robust = pairs[pairs["matcher_name"] == "gwot-robust"]
    assert robust["variant"].tolist() == ["normal", "smaller", "larger", "mirrored"]
    assert set(robust["orientation"]) <= {"original", "mirrored"}
    assert robust["objective_original"].notna().all() and robust["objective_mirrored"].notna().all()
    kept = robust["orientation"] == "mirrored"
    gap = robust["objective_original"] - robust["objective_mirrored"]
    assert (gap[kept] > 0).all() and kept[gap > 0.02].all()  # beyond the margin: kept; below it: only if lower
    assert robust["scale_estimate"].gt(0).all() and robust["k_src"].ge(5).all() and robust["k_trg"].ge(5).all()
    nn = pairs[pairs["matcher_name"] == "nn"]
    assert nn["orientation"].isna().all() and nn["scale_estimate"].isna().all()
