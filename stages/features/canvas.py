"""Image <-> canvas geometry: keep the aspect ratio, resize the long side, pad to a centred square.

Coordinates follow the benchmarks' pixel-centre convention: pixel (col, row) has centre (col, row) and
covers [col - 0.5, col + 0.5). Resizing by s maps x to (x + 0.5) * s - 0.5 (what a resize with
``align_corners=False`` does), then padding shifts by the left/top margin. Patch (row i, col j) of a
patch-``p`` grid covers canvas pixels [j p, (j + 1) p) and has its centre at (j p + (p - 1) / 2, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from stages.features.backbone_keys import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CanvasTransform:
    """How one image sits on its square canvas: ``canvas = (image + 0.5) * scale - 0.5 + pad`` per axis."""

    width: int  # original image size in pixels
    height: int
    resized_width: int  # size of the resized image on the canvas
    resized_height: int
    pad_left: int
    pad_top: int
    canvas_size: int
    patch_size: int

    @classmethod
    def fit(cls, width: int, height: int, canvas_size: int, patch_size: int = 14) -> CanvasTransform:
        """The transform that resizes the long side to ``canvas_size`` and centres the image on the square."""
        if canvas_size % patch_size:
            raise ValueError(f"canvas size {canvas_size} is not a multiple of the patch size {patch_size}")
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        scale = canvas_size / max(width, height)
        resized_width = min(canvas_size, max(1, round(width * scale)))
        resized_height = min(canvas_size, max(1, round(height * scale)))
        return cls(
            width=width,
            height=height,
            resized_width=resized_width,
            resized_height=resized_height,
            pad_left=(canvas_size - resized_width) // 2,
            pad_top=(canvas_size - resized_height) // 2,
            canvas_size=canvas_size,
            patch_size=patch_size,
        )

    @property
    def scale_x(self) -> float:
        """Canvas pixels per original pixel along x."""
        return self.resized_width / self.width

    @property
    def scale_y(self) -> float:
        """Canvas pixels per original pixel along y."""
        return self.resized_height / self.height

    @property
    def grid_size(self) -> int:
        """Patches per side of the canvas (Hp = Wp)."""
        return self.canvas_size // self.patch_size

    def to_canvas(self, points: np.ndarray) -> np.ndarray:
        """Map original-image points [..., 2] (x, y) to canvas pixel coordinates."""
        points = np.asarray(points, dtype=np.float64)
        out = np.empty_like(points)
        out[..., 0] = (points[..., 0] + 0.5) * self.scale_x - 0.5 + self.pad_left
        out[..., 1] = (points[..., 1] + 0.5) * self.scale_y - 0.5 + self.pad_top
        return out

    def to_image(self, points: np.ndarray) -> np.ndarray:
        """Map canvas pixel coordinates [..., 2] back to original-image points (the exact inverse)."""
        points = np.asarray(points, dtype=np.float64)
        out = np.empty_like(points)
        out[..., 0] = (points[..., 0] - self.pad_left + 0.5) / self.scale_x - 0.5
        out[..., 1] = (points[..., 1] - self.pad_top + 0.5) / self.scale_y - 0.5
        return out

    def patch_centres(self) -> np.ndarray:
        """Canvas coordinates of every patch centre, [Hp, Wp, 2] (x, y)."""
        centres = np.arange(self.grid_size) * self.patch_size + (self.patch_size - 1) / 2
        xs, ys = np.meshgrid(centres, centres)
        return np.stack([xs, ys], axis=-1)

    def valid_patches(self) -> np.ndarray:
        """[Hp, Wp] bool: patches whose centre lies on the image rather than on the padding."""
        centres = self.patch_centres()
        x, y = centres[..., 0], centres[..., 1]
        inside_x = (x >= self.pad_left - 0.5) & (x <= self.pad_left + self.resized_width - 0.5)
        inside_y = (y >= self.pad_top - 0.5) & (y <= self.pad_top + self.resized_height - 0.5)
        return inside_x & inside_y

    def as_dict(self) -> dict[str, int]:
        """Plain fields, for storing as Zarr attributes; ``CanvasTransform(**d)`` restores it."""
        return asdict(self)


def image_to_canvas(image: np.ndarray, transform: CanvasTransform, *, normalize: bool = True) -> torch.Tensor:
    """Resize an [H, W, 3] uint8 image bilinearly (antialiased) onto its padded canvas, [3, S, S] float32.

    With ``normalize`` the ImageNet mean/std are applied and padding is 0 after normalisation (the mean
    colour); without it values are in [0, 1] and padding is 0.
    """
    import torch  # here, not at the top: the geometry above serves commands that never touch torch

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {image.shape}")
    if image.shape[:2] != (transform.height, transform.width):
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]} but the transform is for {transform.width}x{transform.height}"
        )
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    resized = torch.nn.functional.interpolate(
        pixels,
        size=(transform.resized_height, transform.resized_width),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0].clamp_(0.0, 1.0)
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        resized = (resized - mean) / std
    canvas = torch.zeros(3, transform.canvas_size, transform.canvas_size)
    top, left = transform.pad_top, transform.pad_left
    canvas[:, top : top + transform.resized_height, left : left + transform.resized_width] = resized
    return canvas
