"""Patch-feature extractors: ViTs through timm (DINOv2 above all; hub, local or random weights) and DAISY.

Every backbone maps ImageNet-normalised square canvases [B, 3, S, S] (``image_to_canvas``) to patch tokens
[B, Hp, Wp, C] float32 on its device, Hp = Wp = S / patch_size, and describes everything that changes
those numbers in ``key_params()`` (``stages.features.backbone_keys``, which computes them without loading
anything): equal parameters give equal features, so the feature cache is keyed by them.

``model`` is ``daisy`` or any timm ViT name (``vit_base_patch14_dinov2.lvd142m``); a ViT trained with
another normalisation than ImageNet's gets its canvas renormalised. Weights (``weights``):

- ``"hub"``: timm's pretrained weights from the Hugging Face hub (or its local cache);
- ``"random"`` / ``"random:<seed>"``: a random initialisation with a fixed seed, for tests only
  (``random_weights`` is then true so that every output can be labelled as meaningless);
- a path to a ``.safetensors`` / ``.pth`` state dict, either in timm's layout or in the original
  facebookresearch/dinov2 layout (``dinov2_vits14_pretrain.pth``). timm's own ``checkpoint_filter_fn``
  converts the latter: it drops ``mask_token``, renames the giant models' SwiGLU ``mlp.w12``/``mlp.w3`` to
  ``mlp.fc1``/``mlp.fc2`` and, for register models, renames ``register_tokens`` to ``reg_token``, folds
  the class position ``pos_embed[:, 0]`` into ``cls_token`` and keeps ``pos_embed[:, 1:]``; every other
  key (``blocks.N.attn.qkv.weight``, ``blocks.N.ls1.gamma``, ``patch_embed.proj.weight``...) is shared.

``check_weights`` (``stages.features.weights``) finds weights that cannot be loaded on the driver, in
about a second and without retries, before any cluster starts: hub weights neither in the Hugging Face
cache nor reachable, a weights file that cannot be read or whose tensors do not fit the model.

The position embedding is resampled once, when the backbone is built for its canvas size, from the
checkpoint's grid (37 x 37 for DINOv2) to S / patch patches per side. ``pos_embed="dinov2"`` (the default,
for DINOv2 models only) does it exactly as the original DINOv2 code's ``interpolate_pos_encoding`` does,
so that the tokens equal those of SD+DINO, GeoAware-SC and every published zero-shot number
(``dinov2_pos_embed``); ``pos_embed="timm"`` keeps timm's own resampling (bicubic to the target size,
antialiased), which differs from the original for the plain DINOv2 models. Hub and file weights are
loaded into a model built on the meta device, skipping a random initialisation that would take minutes
for ViT-g on a CPU. On CUDA the forward pass runs under bfloat16 autocast (half the memory, tensor cores);
on every other device in float32. The compute dtype is a key parameter.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import scipy.ndimage
import timm
import torch
from skimage.feature import daisy
from timm.models import load_state_dict
from timm.models.vision_transformer import checkpoint_filter_fn

from stages.features.backbone_keys import (
    DAISY,
    DAISY_SHAPE,
    DINOV2_MODELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneError,
    WeightsUnavailableError,
    backbone_key,
    backbone_key_params,
    hub_source,
    patch_size,
)
from stages.features.canvas import CanvasTransform
from stages.features.weights import check_weights, hub_weights_file, weights_unavailable

__all__ = [
    "DINOV2_MODELS",
    "Backbone",
    "BackboneError",
    "WeightsUnavailableError",
    "backbone_key",
    "backbone_key_params",
    "check_weights",
    "create_backbone",
    "dinov2_pos_embed",
]

# ITU-R 601 luma weights, as skimage.color.rgb2gray.
GREY_WEIGHTS = (0.2125, 0.7154, 0.0721)


class Backbone(ABC):
    """A patch-feature extractor: ``backbone(canvases [B, 3, S, S]) -> tokens [B, Hp, Wp, C]`` float32.

    Canvases are ImageNet-normalised (``image_to_canvas(..., normalize=True)``). The model (if any) is
    loaded once, in the constructor, and runs in eval mode under ``torch.inference_mode``. ``flip`` asks
    the caller to store ``flipped()`` features too (so it is a key parameter); ``random_weights`` marks
    features that mean nothing.
    """

    dim: int

    def __init__(
        self,
        model: str,
        *,
        weights: str,
        image_size: int,
        layer: str,
        flip: bool,
        device: str | torch.device,
        pos_embed: str = "dinov2",
    ):
        self._params = backbone_key_params(
            model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device, pos_embed=pos_embed
        )
        self.patch_size = patch_size(model)
        self.weights = weights
        self.image_size = image_size
        self.layer = layer
        self.pos_embed = pos_embed
        self.flip = flip
        self.random_weights = self._params["weights"].startswith("random")
        self.device = torch.device(device)

    @property
    def grid_size(self) -> int:
        """Patches per side of the canvas (Hp = Wp)."""
        return self.image_size // self.patch_size

    def key_params(self) -> dict[str, Any]:
        """Everything that changes the numbers (model, weights identity, canvas size, layer, ...)."""
        return dict(self._params)

    def key(self) -> str:
        """A readable, unique name for these parameters: ``<model>-<size>[-RANDOM]-<hash>``."""
        return backbone_key(self._params)

    def __call__(self, canvases: torch.Tensor) -> torch.Tensor:
        """Patch tokens of canvases [B, 3, S, S] float32: [B, Hp, Wp, C] float32 on the backbone's device."""
        expected = (3, self.image_size, self.image_size)
        if canvases.ndim != 4 or tuple(canvases.shape[1:]) != expected:
            raise ValueError(f"expected canvases [B, {', '.join(map(str, expected))}], got {list(canvases.shape)}")
        with torch.inference_mode():
            return self._tokens(canvases.to(self.device, torch.float32))

    def flipped(self, canvases: torch.Tensor) -> torch.Tensor:
        """Tokens of the left-right mirrored canvases, mirrored back: [B, Hp, Wp, C] on the original grid.

        ``flipped(x)[:, i, j]`` describes the canvas patch (i, j) as seen in the mirror image, so it shares
        the patch grid and validity mask of ``self(x)``.
        """
        return self(canvases.flip(-1)).flip(2)

    @abstractmethod
    def _tokens(self, canvases: torch.Tensor) -> torch.Tensor:
        """Tokens [B, Hp, Wp, C] float32 of canvases [B, 3, S, S] already on the device."""


class ViT(Backbone):
    """A timm ViT (DINOv2 above all); tokens of the last block before (``prenorm``) or after (``norm``) its norm."""

    def __init__(self, model: str, **options: Any):
        """Options as ``Backbone``'s."""
        super().__init__(model, **options)
        # float(): a half-precision weights file still runs in float32 (autocast decides the compute dtype)
        network = self._build(model, self.weights).float()
        _set_canvas_size(network, self.image_size, self.pos_embed)
        self.model = network.to(self.device).eval().requires_grad_(False)
        self.dim = self.model.embed_dim
        self._dtype = getattr(torch, self._params["compute_dtype"])
        self._renormalise = _renormalisation(self._params["normalisation"], self.device)

    def _build(self, model: str, weights: str) -> torch.nn.Module:
        """The network at its weights' own grid (timm's default size for random weights), not yet resampled."""
        if self.random_weights:
            with torch.random.fork_rng(devices=[]):  # a fixed init that leaves the caller's RNG alone
                torch.manual_seed(int(self._params["weights"].removeprefix("random:")))
                return timm.create_model(model, pretrained=False, num_classes=0)
        if weights == "hub":
            path = hub_weights_file(model)
            state, source = (_hub_state_dict(model) if path is None else _read_weights_file(path)), f"hub:{model}"
        else:
            path = Path(weights).expanduser()
            state, source = _read_weights_file(path), str(path)
        network = _meta_network(model, _checkpoint_grid(state))
        network.load_state_dict(_converted_state_dict(network, state, source=source, model=model), assign=True)
        return network

    def _tokens(self, canvases: torch.Tensor) -> torch.Tensor:
        if self._renormalise is not None:
            scale, shift = self._renormalise
            canvases = canvases * scale + shift
        with torch.autocast(self.device.type, dtype=self._dtype, enabled=self._dtype != torch.float32):
            (tokens,) = self.model.forward_intermediates(
                canvases, indices=1, norm=self.layer == "norm", output_fmt="NLC", intermediates_only=True
            )
        return tokens.float().reshape(len(canvases), self.grid_size, self.grid_size, self.dim)


def _renormalisation(normalisation: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` that take an ImageNet-normalised canvas to the model's own normalisation, or None."""
    if normalisation == "imagenet":
        return None
    mean, std = (torch.tensor(values, device=device).view(1, 3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
    own_mean, own_std = (torch.tensor(normalisation[k], device=device).view(1, 3, 1, 1) for k in ("mean", "std"))
    return std / own_std, (mean - own_mean) / own_std


def _meta_network(model: str, grid: int | None) -> torch.nn.Module:
    """``model`` on the meta device (no wasted random init), at the checkpoint's ``grid`` so that loading
    resamples nothing (``_set_canvas_size`` does it once); timm's default size when ``grid`` is None."""
    size = {} if grid is None else {"img_size": grid * patch_size(model)}
    with torch.device("meta"):
        return timm.create_model(model, pretrained=False, num_classes=0, **size)


def _checkpoint_grid(state: dict[str, torch.Tensor]) -> int | None:
    """M for a state dict whose ``pos_embed`` covers an M x M patch grid (with or without a class position);
    None when it has no usable ``pos_embed`` (loading then names the problem)."""
    pos_embed = state.get("pos_embed")
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.ndim != 3:
        return None
    for n_patches in (pos_embed.shape[1], pos_embed.shape[1] - 1):  # n and n + 1 are never both squares
        side = math.isqrt(max(n_patches, 0))
        if side and side * side == n_patches:
            return side
    return None


def dinov2_pos_embed(patch_pos_embed: torch.Tensor, grid: int, *, registers: bool) -> torch.Tensor:
    """The patch position embedding [1, M * M, C] resampled to a ``grid`` x ``grid`` canvas as the original
    DINOv2 code (``DinoVisionTransformer.interpolate_pos_encoding``) does it: [1, grid * grid, C].

    Plain models (hub ``dinov2_vit*14``: ``interpolate_offset=0.1``, ``interpolate_antialias=False``):
    bicubic by ``scale_factor = (grid + 0.1) / M``, no antialiasing. Register models (``dinov2_vit*14_reg``:
    offset 0, antialias True): bicubic to the size ``grid``, antialiased. ``grid == M`` returns the
    embedding unchanged (the original skips the interpolation there). Interpolates in float32.
    """
    side = math.isqrt(patch_pos_embed.shape[1])
    if grid == side:
        return patch_pos_embed
    dim = patch_pos_embed.shape[-1]
    square = patch_pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if registers:
        resampled = torch.nn.functional.interpolate(square, size=(grid, grid), mode="bicubic", antialias=True)
    else:
        scale = (grid + 0.1) / side
        resampled = torch.nn.functional.interpolate(
            square, scale_factor=(scale, scale), mode="bicubic", antialias=False
        )
    return resampled.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(patch_pos_embed.dtype)


def _set_canvas_size(network: torch.nn.Module, image_size: int, pos_embed: str) -> None:
    """Resize a timm ViT to ``image_size`` canvases once: its position embedding is resampled by timm's
    ``set_input_size`` and, for ``pos_embed="dinov2"``, replaced by the original DINOv2 resampling."""
    native = network.pos_embed.detach() if pos_embed == "dinov2" else None
    network.set_input_size(img_size=image_size)
    if native is not None:
        n_prefix = 0 if network.no_embed_class else network.num_prefix_tokens  # class position of plain models
        (grid, _) = network.patch_embed.grid_size
        patches = dinov2_pos_embed(native[:, n_prefix:], grid, registers=network.num_reg_tokens > 0)
        network.pos_embed = torch.nn.Parameter(torch.cat([native[:, :n_prefix], patches], dim=1), requires_grad=False)


def _hub_state_dict(model: str) -> dict[str, torch.Tensor]:
    """timm's pretrained state dict of ``model``, downloaded from the Hugging Face hub."""
    repo, filename, _ = hub_source(model)
    try:
        return timm.models.load_state_dict_from_hf(repo, **({"filename": filename} if filename else {}))
    except OSError as error:  # huggingface_hub's connection, offline and not-found errors are all OSErrors
        raise weights_unavailable(model, str(error)) from error


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in a ``.safetensors`` or ``.pth`` file."""
    try:
        return load_state_dict(str(path), use_ema=False)
    except Exception as error:  # torch and safetensors raise many types on unreadable files
        raise BackboneError(f"{path}: cannot read the weights file: {error}") from error


def _weights_file_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file as meta tensors: names and shapes only, no tensor data read."""
    try:
        if path.suffix == ".safetensors":
            with safetensors.safe_open(str(path), framework="pt") as file:
                return {key: torch.empty(file.get_slice(key).get_shape(), device="meta") for key in file.keys()}
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # mapped, not read
    except Exception as error:  # torch and safetensors raise many types on unreadable files
        raise BackboneError(f"{path}: cannot read the weights file: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))  # the wrappers timm's load_state_dict unwraps
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: not a state dict (a {type(state).__name__})")
    return {
        key.removeprefix("module."): torch.empty(value.shape, device="meta")
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }


def check_weights_file(model: str, path: Path) -> None:
    """Raise BackboneError when the weights file at ``path`` cannot be read or does not fit ``model``: names
    and shapes only, no tensor data read (``weights.check_weights`` calls it on the driver)."""
    state = _weights_file_shapes(path)
    _converted_state_dict(_meta_network(model, _checkpoint_grid(state)), state, source=str(path), model=model)


def _converted_state_dict(
    network: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, model: str
) -> dict[str, torch.Tensor]:
    """A timm- or original-DINOv2-layout state dict converted to ``network``'s keys; name ``source`` on any
    mismatch. timm's ``checkpoint_filter_fn`` converts the original layout (the network is built at the
    checkpoint's grid, so it resamples nothing)."""
    state = checkpoint_filter_fn(state, network)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        problems = [
            f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("keys of the wrong shape", wrong_shape),
            )
            if keys
        ]
        raise BackboneError(
            f"{source}: not a state dict of {model} (timm or original DINOv2 layout); {'; '.join(problems)}"
        )
    return state


class Daisy(Backbone):
    """Weights-free DAISY descriptors (skimage) on the grey canvas, one per patch centre, L2-normalised.

    The descriptor radius is one patch (14 px), so each descriptor sees a disc two patches wide; rings=2,
    histograms=6, orientations=8 give C = (2 * 6 + 1) * 8 = 104. Deterministic; about 300 MB of transient
    memory per 840-px canvas (skimage computes the descriptor at every pixel before subsampling).
    """

    radius = DAISY_SHAPE["radius"]
    rings = DAISY_SHAPE["rings"]
    histograms = DAISY_SHAPE["histograms"]
    orientations = DAISY_SHAPE["orientations"]
    dim = (rings * histograms + 1) * orientations

    def __init__(self, model: str, **options: Any):
        """Options as ``Backbone``'s."""
        super().__init__(model, **options)
        size = self.image_size
        centres = CanvasTransform.fit(size, size, size, self.patch_size).patch_centres()
        self._first_centre = int(np.floor(centres[0, 0, 0]))
        self._subpixel = float(centres[0, 0, 0] - self._first_centre)

    def _tokens(self, canvases: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN, device=canvases.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=canvases.device).view(1, 3, 1, 1)
        weights = torch.tensor(GREY_WEIGHTS, device=canvases.device).view(1, 3, 1, 1)
        greys = ((canvases * std + mean) * weights).sum(1).clamp(0.0, 1.0).cpu().numpy()
        tokens = np.stack([self._descriptors(grey) for grey in greys])
        return torch.from_numpy(tokens).to(self.device)

    def _descriptors(self, grey: np.ndarray) -> np.ndarray:
        """[Hp, Wp, C] descriptors of one [S, S] grey canvas, centred on the patch centres."""
        # skimage puts descriptors on integer pixels `radius + k * step`; resampling by the centres'
        # sub-pixel offset and padding by `radius - first_centre` puts them exactly on the patch centres.
        shifted = scipy.ndimage.shift(grey, -self._subpixel, order=1, mode="nearest")
        before = self.radius - self._first_centre
        padded = np.pad(shifted, ((before, self.radius), (before, self.radius)), mode="edge")
        descriptors = daisy(
            padded,
            step=self.patch_size,
            radius=self.radius,
            rings=self.rings,
            histograms=self.histograms,
            orientations=self.orientations,
            normalization="daisy",
        )[: self.grid_size, : self.grid_size]
        return (descriptors / np.linalg.norm(descriptors, axis=-1, keepdims=True)).astype(np.float32)


def create_backbone(
    model: str,
    *,
    weights: str,
    image_size: int,
    layer: str,
    flip: bool,
    device: str | torch.device = "cpu",
    pos_embed: str = "dinov2",
) -> Backbone:
    """Build the backbone called ``model`` (``daisy`` or a timm ViT name verbatim) on ``device``.

    ``pos_embed`` (ViTs): ``dinov2`` resamples the position embedding as the original DINOv2 code does
    (DINOv2 models only), ``timm`` as timm does.
    """
    kind = Daisy if model == DAISY else ViT
    return kind(
        model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device, pos_embed=pos_embed
    )
