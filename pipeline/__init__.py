"""How the stages run: catalog, cache, stores, cluster, runner and the command line; and the notebook API.

``from pipeline import match_images, load_pair`` reaches :mod:`stages.api` lazily: importing ``pipeline``
alone (the command line does) loads neither torch nor any stage.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_NOTEBOOK_API = ("match_images", "load_pair", "Match", "BenchmarkPair", "PairFeatures")
__all__ = ["__version__", *_NOTEBOOK_API]


def __getattr__(name: str) -> Any:
    """The notebook API's names, imported from :mod:`stages.api` on first use."""
    if name in _NOTEBOOK_API:
        return getattr(importlib.import_module("stages.api"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
