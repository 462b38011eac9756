"""The report of a real run (demo with a GWOT sweep, and the TSS sample): its numbers against pandas
groupbys of the Parquet files, its pictures, its links, and the random-weights warning."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.catalog import load_catalog
from pipeline.cli import cli
from stages.report import plots, tables
from stages.report.draw import GAP
from stages.report.stage import report_numbers
from stages.report.tables import load_run

CATALOG = {
    "stores": {"data_root": "data", "cache_root": "cache", "outputs": "outputs"},
    "datasets": {
        "demo": {"kind": "demo", "options": {"n_pairs": 4, "max_side": 112, "n_keypoints": 8}},
        "tss": {
            "kind": "tss",
            "sources": [{"url": "http://127.0.0.1:9/TSS_CVPR2016.zip", "filename": "TSS_CVPR2016.zip"}],
        },
    },
    "backbones": {"daisy": {"model": "daisy", "weights": "none", "image_size": 112}},
    "default_backbone": "daisy",
    "matchers": {"nn": {"method": "nn"}, "gwot": {"method": "gwot", "params": {"outer_iters": 3}}},
    "cluster": {"n_workers": 1, "processes": False},
}
STAGES = ["--stage", "download", "--stage", "normalize", "--stage", "features", "--stage", "match"]
DEMO_GWOT = ("gwot[eps=0.02]", "gwot[eps=0.05]")


def invoke(catalog: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--catalog", str(catalog), "-q", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_fixtures):
    """A run ``default`` of the demo (nn and gwot at eps 0.02 and 0.05) and of the TSS sample (nn and
    gwot), its report built by ``run --stage report``; returns (catalog path, run folder, that output)."""
    root = tmp_path_factory.mktemp("report")
    archive = shutil.make_archive(
        str(root / "TSS_CVPR2016"), "zip", root_dir=shared_fixtures / "tss", base_dir="TSS_CVPR2016"
    )
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(CATALOG))
    invoke(catalog, "run", *STAGES, "--dataset", "demo", "--set", "gwot.eps=0.02,0.05")
    output = invoke(catalog, "run", *STAGES, "--stage", "report", "--dataset", "tss", "--archive", archive)
    return catalog, root / "outputs" / "default", output


def markdown_table(markdown: str, caption: str) -> pd.DataFrame:
    """The Markdown table under the bold ``caption`` line, as strings."""
    lines = markdown.split(f"**{caption}**\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    return pd.DataFrame(cells[2:], columns=cells[0])


def pair_pck(pairs: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per scored pair: n_correct and n_kps at ``alpha``, read from the pairs table's list columns."""
    scored = pairs[pairs["n_kps"] > 0].copy()
    position = scored["alphas"].map(lambda alphas: int(np.argmin(np.abs(np.asarray(alphas) - alpha))))
    scored["correct"] = [int(counts[i]) for counts, i in zip(scored["n_correct"], position, strict=True)]
    scored["fraction"] = scored["correct"] / scored["n_kps"]
    return scored


def averages(scored: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    grouped = scored.groupby(by, observed=True)
    return pd.DataFrame(
        {
            "per_image": grouped["fraction"].mean(),
            "per_keypoint": grouped["correct"].sum() / grouped["n_kps"].sum(),
            "n_pairs": grouped.size(),
        }
    )


def shown(value: str) -> float:
    """A rendered percentage (``78.1``, ``+21.9``) as a fraction."""
    return float(value) / 100


def test_run_ends_with_the_report_path_and_status_reports_it_done(run):
    catalog, folder, output = run
    index = folder / "report" / "index.html"
    assert output.splitlines()[-1] == f"report: {index}"
    assert index.is_file() and (folder / "report" / "report.md").is_file()
    status = invoke(catalog, "status", "--dataset", "tss").splitlines()
    assert [line.split()[:4] for line in status if line.split()[1] == "report"] == [["tss", "report", "done", "1/1"]]


def test_headline_and_gwot_minus_nn_equal_a_groupby_of_the_pairs_parquet(run):
    _, folder, _ = run
    pairs = pd.read_parquet(folder / "pairs")
    markdown = (folder / "report" / "report.md").read_text()
    table = markdown_table(markdown, "PCK of every dataset and matcher setting").set_index(["dataset", "matcher"])
    numbers = report_numbers(load_run(folder))["headline"].set_index(["dataset", "matcher", "alpha"])
    assert len(table) == 5 and "RANDOM" not in markdown
    assert "error <= alpha x the reference length (trg_image = max(W, H) of the target image)" in markdown
    expected = {}
    for alpha in (0.01, 0.05, 0.1, 0.15):
        expected[alpha] = averages(pair_pck(pairs, alpha), ["dataset", "matcher"])
        for (dataset, label), row in expected[alpha].iterrows():
            for averaging, short in (("per_image", "img"), ("per_keypoint", "kp")):
                assert numbers.loc[(dataset, label, alpha), averaging] == pytest.approx(row[averaging], abs=1e-12)
                assert table.loc[(dataset, label), f"PCK@{alpha:g} {short}"] == f"{100 * row[averaging]:.1f}"
            assert int(table.loc[(dataset, label), "pairs"]) == row["n_pairs"] == (4 if dataset == "demo" else 6)

    delta = markdown_table(
        markdown, "GWOT - NN: each GWOT setting minus the NN setting of its dataset and backbone (points)"
    ).set_index(["dataset", "GWOT"])
    assert sorted(delta.index) == [("demo", DEMO_GWOT[0]), ("demo", DEMO_GWOT[1]), ("tss", "gwot")]
    assert set(delta["NN"]) == {"nn"}
    for (dataset, label), row in delta.iterrows():
        for alpha, means in expected.items():
            for averaging, short in (("per_image", "img"), ("per_keypoint", "kp")):
                difference = means.loc[(dataset, label), averaging] - means.loc[(dataset, "nn"), averaging]
                assert shown(row[f"Δ PCK@{alpha:g} {short}"]) == pytest.approx(difference, abs=5.1e-4)


def test_category_and_sweep_tables_equal_a_groupby_at_alpha_01(run):
    _, folder, _ = run
    pairs = pd.read_parquet(folder / "pairs")
    keypoints = pd.read_parquet(folder / "keypoints")
    markdown = (folder / "report" / "report.md").read_text()
    # PCK@0.1 per pair, counted from the keypoints table this time (the report's route is the same rule).
    keypoints["correct"] = keypoints["error"] <= 0.1 * keypoints["ref_length"]
    counts = keypoints.groupby(["dataset", "setting", "pair_id"], observed=True)["correct"].sum()
    scored = pairs[pairs["n_kps"] > 0].set_index(["dataset", "setting", "pair_id"])
    scored = scored.assign(correct=counts.reindex(scored.index).to_numpy()).reset_index()
    scored["fraction"] = scored["correct"] / scored["n_kps"]
    by_category = averages(scored, ["dataset", "category", "matcher"])
    assert set(by_category.index.get_level_values("category")) == {
        "astronaut", "chelsea", "coffee", "rocket", "JODS", "PASCAL",
    }  # fmt: skip
    numbers = report_numbers(load_run(folder))["categories"].set_index(["dataset", "category", "matcher"])
    for dataset in ("demo", "tss"):
        table = markdown_table(markdown, f"{dataset}: PCK@0.1 per category, img / kp (%)").set_index("category")
        for (category, label), row in by_category.loc[dataset].iterrows():
            assert numbers.loc[(dataset, category, label), "per_image"] == pytest.approx(row["per_image"])
            assert numbers.loc[(dataset, category, label), "per_keypoint"] == pytest.approx(row["per_keypoint"])
            assert table.loc[category, label] == f"{100 * row['per_image']:.1f} / {100 * row['per_keypoint']:.1f}"
            assert int(table.loc[category, "pairs"]) == row["n_pairs"]

    backbone_key = pairs["backbone_key"].iloc[0]
    sweep = markdown_table(markdown, f"demo: settings of gwot on {backbone_key}, PCK@0.1 (%)")
    assert list(sweep.columns) == ["matcher", "eps", "pairs", "PCK@0.1 img", "PCK@0.1 kp"]
    assert list(sweep["matcher"]) == list(DEMO_GWOT) and list(sweep["eps"]) == ["0.02", "0.05"]
    at_01 = averages(pair_pck(pairs, 0.1), ["dataset", "matcher"])  # from the pairs table's own PCK@0.1
    for row in sweep.itertuples(index=False):
        assert row[3] == f"{100 * at_01.loc[('demo', row.matcher), 'per_image']:.1f}"
        assert row[4] == f"{100 * at_01.loc[('demo', row.matcher), 'per_keypoint']:.1f}"
    assert "## By difficulty" not in markdown  # the demo and TSS have no SPair annotations


def test_tss_flow_table_equals_the_mean_of_the_stored_accuracies(run):
    _, folder, _ = run
    pairs = pd.read_parquet(folder / "pairs")
    table = markdown_table((folder / "report" / "report.md").read_text(), "Flow accuracy per subset")
    tss = table[table["dataset"] == "tss"].set_index(["subset", "matcher", "averaging"])
    assert sorted(tss.index) == [
        (subset, matcher, averaging)
        for subset in ("JODS", "PASCAL")
        for matcher in ("gwot", "nn")
        for averaging in ("all", "w/o flip")
    ]
    rows = pairs[pairs["dataset"] == "tss"]
    for (subset, matcher), group in rows.groupby(["category", "matcher"]):
        accuracy = np.stack(group["flow_accuracy"].to_numpy())
        unflipped = np.stack(group.loc[~group["flip"], "flow_accuracy"].to_numpy())
        for averaging, values in (("all", accuracy), ("w/o flip", unflipped)):
            row = tss.loc[(subset, matcher, averaging)]
            assert int(row["directions"]) == len(values)
            for t in (1, 5, 10):
                assert row[f"T{t}"] == f"{100 * values[:, t - 1].mean():.1f}"
    demo = table[table["dataset"] == "demo"].set_index(["matcher", "averaging"])  # the demo's flipped pair
    assert demo.loc[("nn", "all"), "directions"] == "4" and demo.loc[("nn", "w/o flip"), "directions"] == "3"


def test_pck_curves_agree_with_the_stored_pck_at_the_catalog_alphas(run):
    _, folder, _ = run
    pairs = pd.read_parquet(folder / "pairs")
    curves = report_numbers(load_run(folder))["curves"]
    assert np.allclose(sorted(curves["alpha"].unique()), np.linspace(0, 0.2, 81))
    for alpha in (0.05, 0.1, 0.15):
        expected = averages(pair_pck(pairs, alpha), ["dataset", "matcher"])["per_keypoint"]
        at = curves[np.isclose(curves["alpha"], alpha)].set_index(["dataset", "matcher"])["pck"]
        assert at.to_dict() == pytest.approx(expected.to_dict(), abs=1e-12)
    for _, curve in curves.groupby(["dataset", "setting"]):
        assert (np.diff(curve["pck"].to_numpy()) >= 0).all()


class References(HTMLParser):
    """Every src and href of a page, and each image's (src, alt)."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.images: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.links += [value for name, value in attrs if name in ("src", "href")]
        if tag == "img":
            self.images.append((attributes["src"], attributes["alt"]))


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_html_links_exist_and_every_png_has_its_size_and_content(run):
    catalog, folder, _ = run
    report = folder / "report"
    page = References()
    page.feed((report / "index.html").read_text())
    assert page.links and all((report / link).is_file() and "/" not in link for link in page.links)
    assert sorted(page.links) == sorted(p.name for p in report.glob("*.png"))  # every picture is shown
    assert {link.split("-")[0] for link in page.links} == {
        "pck", "pair", "categories", "sweep", "scatter", "subsets", "subset"
    }  # fmt: skip
    assert (
        "subsets-demo.png" in page.links
        and "(mirrored target; target object ~0.5x" in (report / "report.md").read_text()
    )
    assert "pair-error-tss.png" in page.links and "sweep-demo-daisy-112-" in " ".join(page.links)

    data = Path(load_catalog(catalog, environ={}).stores.data_root)
    images = pd.concat(
        [pd.read_parquet(data / "normalized" / d / "images.parquet") for d in ("demo", "tss")]
    ).set_index("image_id")
    pairs = pd.read_parquet(folder / "pairs").drop_duplicates("pair_id").set_index("pair_id")
    warps = 0
    for file, alt in page.images:
        picture = png(report / file)
        assert picture.std() > 20, file  # not blank
        if not file.startswith(("pair-", "subset-")) or "-error-" in file:
            assert picture.shape == (plots.PIXELS[1], plots.PIXELS[0], 3), file
            continue
        pair_id = alt.split(": ", 1)[1].split(",")[0].split(" [")[0]  # the caption marks subsets in [...]
        src, trg = (images.loc[pairs.loc[pair_id, side]] for side in ("src_image_id", "trg_image_id"))
        if file.endswith("-warp.png"):  # both halves at the target's size
            warps += 1
            assert picture.shape == (trg["height"], 2 * trg["width"] + GAP, 3), file
            continue
        height = min(max(src["height"], trg["height"]), 360)
        width = round(src["width"] * height / src["height"]) + GAP + round(trg["width"] * height / trg["height"])
        assert picture.shape == (height, width, 3), file
    assert warps == 6  # TSS: best, median and worst pair, for gwot and nn


def test_pictures_show_the_best_median_and_worst_pairs_of_gwot_with_their_pck(run):
    _, folder, _ = run
    pairs = pair_pck(pd.read_parquet(folder / "pairs"), 0.1)
    page = References()
    page.feed((folder / "report" / "index.html").read_text())
    # Captions mark the subset of a mirrored or rescaled pair in [...]; compared here without it.
    unmarked = [re.sub(r" \[[^]]*\]", "", alt) for _, alt in page.images]
    drawn = [alt.split(" (")[0] for alt in unmarked if not alt.endswith("predicted flow") and ": " in alt]
    assert any("[larger pair]" in alt for _, alt in page.images)
    for dataset, gwot in (("demo", DEMO_GWOT[0]), ("tss", "gwot")):
        ranked = pairs[(pairs["dataset"] == dataset) & (pairs["matcher"] == gwot)]
        ranked = ranked.sort_values(["fraction", "pair_id"], ascending=[False, True])["pair_id"].tolist()
        chosen = [ranked[0], ranked[len(ranked) // 2], ranked[-1]]
        for pair_id in chosen:
            for label in (gwot, "nn"):
                fraction = pairs.loc[(pairs["pair_id"] == pair_id) & (pairs["matcher"] == label), "fraction"]
                assert f"{label}: {pair_id}, PCK@0.1 = {100 * fraction.item():.1f}%" in drawn


def test_random_weights_and_spair_difficulty_from_rewritten_parts(run):
    """A run whose parts say random weights and carry SPair-style viewpoint levels: the report warns at the
    top and breaks PCK down by viewpoint, as a groupby of the parts does."""
    catalog, folder, _ = run
    copy = folder.parent / "random"
    for table in ("pairs", "keypoints"):
        shutil.copytree(folder / table / "dataset=demo", copy / table / "dataset=demo")
    levels = {"000-astronaut": 0, "001-chelsea": 1, "002-coffee": 2, "003-rocket": 2}
    for part in (copy / "pairs").rglob("part-*.parquet"):
        table = pq.read_table(part)
        ids = table["pair_id"].to_pylist()
        table = table.set_column(
            table.schema.get_field_index("random_weights"), "random_weights", pa.array([True] * len(ids))
        )
        index = table.schema.get_field_index("viewpoint_variation")
        table = table.set_column(index, table.schema.field(index), pa.array([levels[i] for i in ids], pa.int8()))
        pq.write_table(table, part)

    output = invoke(catalog, "report", "--run", "random")
    assert output.splitlines()[-1] == f"report: {copy / 'report' / 'index.html'}"
    markdown = (copy / "report" / "report.md").read_text()
    assert markdown.split("## Run\n\n", 1)[1].startswith("> **RANDOM WEIGHTS: the features of daisy (daisy-112-")
    html = (copy / "report" / "index.html").read_text()
    assert html.index('class="alert"') < html.index("<h2>Headline")
    headline = markdown_table(markdown, "PCK of every dataset and matcher setting")
    assert set(headline["backbone"]) == {"daisy (RANDOM weights)"}

    table = markdown_table(markdown, "demo: PCK@0.1 by viewpoint_variation, img / kp (%)").set_index(
        "viewpoint_variation"
    )
    scored = pair_pck(pd.read_parquet(copy / "pairs"), 0.1)
    expected = averages(scored, ["viewpoint_variation", "matcher"])
    assert sorted(table.index) == ["0", "1", "2"]
    for (level, label), row in expected.iterrows():
        assert table.loc[str(level), label] == f"{100 * row['per_image']:.1f} / {100 * row['per_keypoint']:.1f}"
        assert int(table.loc[str(level), "pairs"]) == row["n_pairs"]
    assert "by scale_variation" not in markdown  # null everywhere: no table


def test_report_of_a_run_without_results_names_the_command(run):
    catalog, _, _ = run
    result = CliRunner().invoke(cli, ["--catalog", str(catalog), "report", "--run", "nothing"])
    assert result.exit_code == 1
    assert "run 'nothing' has no results in" in result.output
    assert "run `pipeline run --stage match --run nothing` first" in result.output


def test_subsets_come_from_the_variant_else_the_flip_and_carry_the_robust_decisions():
    pairs = pd.DataFrame(
        {
            "flip": [False, True, True, False],
            "variant": [None, None, "mirrored", "smaller"],
        }
    )
    assert tables.pair_subsets(pairs).tolist() == ["normal", "mirrored", "mirrored", "smaller"]
    long = pd.DataFrame(
        {
            **{key: ["demo"] * 4 for key in ("dataset", "backbone", "backbone_key", "threshold_kind")},
            "random_weights": False,
            "setting": "m",
            "matcher": "gwot-robust",
            "method": "gwot",
            "params_json": "{}",
            "pair_id": ["a", "b", "c", "d"],
            "alpha": 0.1,
            "n_kps": [4, 4, 4, 4],
            "n_correct": [4, 1, 3, 2],
            "pck": [1.0, 0.25, 0.75, 0.5],
            "flip": [False, True, True, False],
            "variant": [None, None, None, "smaller"],
            "orientation": ["original", "mirrored", "original", "original"],
            "scale_estimate": [1.0, 1.1, 0.9, 0.5],
        }
    )
    table = tables.subset_table(long).set_index("subset")
    assert table.index.tolist() == ["normal", "mirrored", "smaller"]
    assert table.loc["mirrored", "per_image"] == 0.5 and table.loc["mirrored", "per_keypoint"] == 0.5
    assert table.loc["mirrored", "mirrored_kept"] == 0.5 and table.loc["mirrored", "median_scale"] == 1.0
    assert table.loc["smaller", "median_scale"] == 0.5 and table.loc["normal", "mirrored_kept"] == 0.0
