"""The benchmarks: one module per dataset kind, each turning its raw files into the common tables."""

from __future__ import annotations

import importlib
from types import ModuleType

# kind -> module implementing it (imported on demand so that listing kinds stays cheap)
DATASET_KINDS = {
    "tss": "stages.datasets.tss",
    "pf-willow": "stages.datasets.pfwillow",
    "pf-pascal": "stages.datasets.pfpascal",
    "spair": "stages.datasets.spair",
    "demo": "stages.datasets.demo",
}


def dataset_module(kind: str) -> ModuleType:
    """The module that normalises datasets of ``kind`` (it defines ``normalize(raw_dir, spec, report)``)."""
    return importlib.import_module(DATASET_KINDS[kind])
