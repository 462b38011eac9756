"""The TSS kit's per-pair files: Middlebury ``.flo`` flows (with the TSS validity convention) and ``flip_gt.txt``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import DataError

FLO_MAGIC = 202021.25
UNKNOWN_FLOW = 1e10  # value written where the flow is unknown (TSS background)
UNKNOWN_THRESHOLD = 1e9  # a vector is valid when |u| <= 1e9 and |v| <= 1e9


def read_flo(path: str | Path) -> np.ndarray:
    """Read a ``.flo`` file into an [H, W, 2] float32 array of (u, v); DataError names a malformed file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "flow file is missing") from None
    if len(data) < 12:
        raise DataError(path, f"too short for a .flo header ({len(data)} bytes)")
    magic = np.frombuffer(data, np.float32, 1, 0)[0]
    if magic != np.float32(FLO_MAGIC):
        raise DataError(path, f"wrong .flo magic number {magic!r} (expected {FLO_MAGIC})")
    width, height = (int(v) for v in np.frombuffer(data, np.int32, 2, 4))
    expected = 12 + width * height * 2 * 4
    if width <= 0 or height <= 0 or len(data) != expected:
        raise DataError(path, f"header says {width}x{height} ({expected} bytes) but the file has {len(data)} bytes")
    return np.frombuffer(data, np.float32, width * height * 2, 12).reshape(height, width, 2).copy()


def write_flo(path: str | Path, flow: np.ndarray) -> None:
    """Write an [H, W, 2] (u, v) flow as a ``.flo`` file (float32); unknown vectors should hold 1e10."""
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"expected an [H, W, 2] flow, got shape {flow.shape}")
    height, width = flow.shape[:2]
    header = np.array([FLO_MAGIC], np.float32).tobytes() + np.array([width, height], np.int32).tobytes()
    Path(path).write_bytes(header + np.ascontiguousarray(flow).tobytes())


def flow_validity(flow: np.ndarray) -> np.ndarray:
    """[H, W] bool: vectors that are known (|u| <= 1e9 and |v| <= 1e9)."""
    return (np.abs(flow[..., 0]) <= UNKNOWN_THRESHOLD) & (np.abs(flow[..., 1]) <= UNKNOWN_THRESHOLD)


def read_flip(path: Path) -> bool:
    """A pair's ``flip_gt.txt``: True when the pair is mirrored; DataError unless the file holds 0 or 1."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise DataError(path, "flip_gt.txt is missing") from None
    if text not in ("0", "1"):
        raise DataError(path, f"expected 0 or 1, got {text[:20]!r}")
    return text == "1"
