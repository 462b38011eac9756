"""Small catalogs for end-to-end tests: the offline demo, DAISY features, an in-process Dask cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DAISY_112 = {"daisy": {"model": "daisy", "weights": "none", "image_size": 112}}
NN_AND_FAST_GWOT = {"nn": {"method": "nn"}, "gwot": {"method": "gwot", "params": {"outer_iters": 3}}}


def write_demo_catalog(
    folder: Path, *, n_pairs: int, matchers: dict[str, Any] | None = None, max_side: int = 96, n_keypoints: int = 6
) -> Path:
    """``folder/catalog.yaml``: the demo dataset of ``n_pairs`` pairs, DAISY at 112 px as the default
    backbone, ``matchers`` (default: nn and a 3-outer-iteration gwot), one in-process worker."""
    options = {"n_pairs": n_pairs, "max_side": max_side, "n_keypoints": n_keypoints}
    body = {
        "datasets": {"demo": {"kind": "demo", "options": options}},
        "backbones": DAISY_112,
        "default_backbone": "daisy",
        "matchers": NN_AND_FAST_GWOT if matchers is None else matchers,
        "cluster": {"n_workers": 1, "processes": False},
    }
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump(body))
    return path
