"""How the stages run: catalog, cache, stores, cluster, registry, runner and the command line.

The notebook API (``from pipeline import match_images, load_pair``) is what the stages registered with
:func:`pipeline.registry.register_api`; each name is imported on first use, so importing ``pipeline`` alone
(the command line does) loads neither torch nor any stage module.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The notebook API's names (and ``__all__``), imported from the module that registered them on first use."""
    registry = importlib.import_module("pipeline.registry")
    if name == "__all__":
        return ["__version__", *registry.api_names()]
    module = registry.api_module(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
