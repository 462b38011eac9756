"""Hand-made rows of the pairs table, for tests of the summaries and of the result files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import results

SETTING = {
    "matcher_name": "nn",
    "method": "nn",
    "params_json": "{}",
    "backbone": "daisy",
    "backbone_key": "daisy-112-abc",
    "random_weights": False,
}


def pair_row(pair_id: str, n_kps: int, n_correct: list[int], **extra) -> dict:
    """A pair result at alphas (0.05, 0.1) with hand-set counts."""
    row = {
        "pair_id": pair_id,
        "split": "test",
        "category": "cat",
        "src_image_id": f"{pair_id}/src",
        "trg_image_id": f"{pair_id}/trg",
        **SETTING,
        "batch": 0,
        "n_kps": n_kps,
        "threshold_kind": "trg_bbox",
        "ref_length": 100.0 if n_kps else None,
        "alphas": [0.05, 0.1],
        "n_correct": n_correct,
        "pck": [c / n_kps if n_kps else np.nan for c in n_correct],
        "flip": False,
        "solve_seconds": 0.1,
    }
    return {**row, **extra}


def pairs_frame(rows: list[dict], dataset: str = "d", matcher: str = "nn", setting: str = "k1") -> pd.DataFrame:
    """Rows as :func:`pipeline.results.read_results` returns them: with the partition columns."""
    table = pa.Table.from_pylist(rows, schema=results.PAIRS_SCHEMA).to_pandas()
    return table.assign(dataset=dataset, matcher=matcher, setting=setting)
