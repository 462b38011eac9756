"""Matchers between patch feature grids: nearest neighbours, the GWOT solver, keypoint and flow readout.

The names below are imported on first use, so that the match stage's driver side (:mod:`stages.match.plan`,
``pipeline status``) imports no torch. The GWOT solver is ``stages.match.gwot.gwot`` (its module's name).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GWOTResult": "stages.match.gwot",
    "NNResult": "stages.match.nn",
    "SinkhornResult": "stages.match.sinkhorn",
    "TransportPlan": "stages.match.transport_plan",
    "dense_flow": "stages.match.readout",
    "nn_match": "stages.match.nn",
    "sinkhorn_unbalanced": "stages.match.sinkhorn",
    "transfer_keypoints": "stages.match.readout",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name's module when the name is first used."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
