"""Matchers between patch feature grids: nearest neighbours, the GWOT solver, keypoint and flow readout."""

from stages.match.gwot import GWOTResult, gwot
from stages.match.nn import NNResult, nn_match
from stages.match.plans import TransportPlan
from stages.match.readout import dense_flow, transfer_keypoints
from stages.match.sinkhorn import SinkhornResult, sinkhorn_unbalanced

__all__ = [
    "GWOTResult",
    "NNResult",
    "SinkhornResult",
    "TransportPlan",
    "dense_flow",
    "gwot",
    "nn_match",
    "sinkhorn_unbalanced",
    "transfer_keypoints",
]
