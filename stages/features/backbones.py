"""Patch-feature extractors: DINOv2 through timm (hub, local or random weights) and a weights-free DAISY.

Every backbone maps ImageNet-normalised square canvases [B, 3, S, S] (``image_to_canvas``) to patch tokens
[B, Hp, Wp, C] float32 on its device, Hp = Wp = S / patch_size, and describes everything that changes
those numbers in ``key_params()``: equal parameters give equal features, so the feature cache is keyed
by them.

Weights of a DINOv2 backbone (``weights``):

- ``"hub"``: timm's pretrained weights from the Hugging Face hub (or its local cache);
- ``"random"`` / ``"random:<seed>"``: a random initialisation with a fixed seed, for tests only
  (``random_weights`` is then true so that every output can be labelled as meaningless);
- a path to a ``.safetensors`` / ``.pth`` state dict, either in timm's layout or in the original
  facebookresearch/dinov2 layout (``dinov2_vits14_pretrain.pth``). timm's own ``checkpoint_filter_fn``
  converts the latter: it drops ``mask_token``, renames the giant models' SwiGLU ``mlp.w12``/``mlp.w3`` to
  ``mlp.fc1``/``mlp.fc2`` and, for register models, renames ``register_tokens`` to ``reg_token``, folds
  the class position ``pos_embed[:, 0]`` into ``cls_token`` and keeps ``pos_embed[:, 1:]``; every other
  key (``blocks.N.attn.qkv.weight``, ``blocks.N.ls1.gamma``, ``patch_embed.proj.weight``...) is shared.

The position embedding is resampled once, when the backbone is built for its canvas size, from the
checkpoint's grid (37 x 37 for DINOv2) to S / 14 patches per side. ``pos_embed="dinov2"`` (the default)
does it exactly as the original DINOv2 code's ``interpolate_pos_encoding`` does, so that the tokens equal
those of SD+DINO, GeoAware-SC and every published zero-shot number (``dinov2_pos_embed``);
``pos_embed="timm"`` keeps timm's own resampling (bicubic to the target size, antialiased), which differs
from the original for the plain models. Hub and file weights are loaded into a model built on the meta
device, skipping a random initialisation that would take minutes for ViT-g on a CPU. On CUDA the forward
pass runs under bfloat16 autocast (half the memory, tensor cores); on every other device in float32. The
compute dtype is a key parameter.
"""

from __future__ import annotations

import functools
import hashlib
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage
import timm
import torch
from skimage.feature import daisy
from timm.models import load_state_dict, load_state_dict_from_hf
from timm.models.vision_transformer import checkpoint_filter_fn

from pipeline.cache import stable_hash
from pipeline.errors import PipelineError
from stages.features.canvas import IMAGENET_MEAN, IMAGENET_STD, CanvasTransform

DINOV2_MODELS = tuple(
    f"vit_{size}_patch14_{variant}dinov2.lvd142m"
    for variant in ("", "reg4_")
    for size in ("small", "base", "large", "giant")
)
LAYERS = ("prenorm", "norm")
POS_EMBED_MODES = ("dinov2", "timm")  # how the position embedding is resampled to the canvas
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# ITU-R 601 luma weights, as skimage.color.rgb2gray.
GREY_WEIGHTS = (0.2125, 0.7154, 0.0721)


class BackboneError(PipelineError):
    """A backbone cannot be built: an unknown name, an invalid option or an unusable weights file."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights could not be downloaded from the Hugging Face hub (or found in its cache)."""


class Backbone(ABC):
    """A patch-feature extractor: ``backbone(canvases [B, 3, S, S]) -> tokens [B, Hp, Wp, C]`` float32.

    Canvases are ImageNet-normalised (``image_to_canvas(..., normalize=True)``). The model (if any) is
    loaded once, in the constructor, and runs in eval mode under ``torch.inference_mode``. ``flip`` asks
    the caller to store ``flipped()`` features too (so it is a key parameter); ``random_weights`` marks
    features that mean nothing.
    """

    patch_size: int
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
        self._params = self.describe(
            model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device, pos_embed=pos_embed
        )
        self.image_size = image_size
        self.flip = flip
        self.random_weights = self._params["weights"].startswith("random")
        self.device = torch.device(device)

    @staticmethod
    @abstractmethod
    def describe(
        model: str,
        *,
        weights: str,
        image_size: int,
        layer: str,
        flip: bool,
        device: str | torch.device,
        pos_embed: str = "dinov2",
    ) -> dict[str, Any]:
        """Validate the options and return the key parameters, without loading anything."""

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


def backbone_key(params: dict[str, Any]) -> str:
    """The store name of a backbone's ``key_params``; random weights are spelled out in it."""
    random_tag = "-RANDOM" if str(params["weights"]).startswith("random") else ""
    return f"{params['model']}-{params['image_size']}{random_tag}-{stable_hash(params)}"


@functools.lru_cache(maxsize=16)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_identity(weights: str) -> str:
    """``hub``, ``random:<seed>`` or ``sha256:<digest>`` of a local file; raises on anything else."""
    if weights == "hub":
        return weights
    if weights == "random":
        return "random:0"
    if weights.startswith("random:"):
        seed = weights.removeprefix("random:")
        if not seed.isdigit():
            raise BackboneError(f"weights {weights!r}: the seed after 'random:' must be a non-negative integer")
        return f"random:{int(seed)}"
    path = Path(weights).expanduser().resolve()
    if path.suffix not in WEIGHT_SUFFIXES or not path.is_file():
        raise BackboneError(
            f"weights must be 'hub', 'random', 'random:<seed>' or the path of an existing "
            f"{'/'.join(WEIGHT_SUFFIXES)} file; got {weights!r}" + ("" if path.is_file() else " (no such file)")
        )
    stat = path.stat()
    return "sha256:" + _file_sha256(path, stat.st_size, stat.st_mtime_ns)


def _check_options(image_size: int, patch_size: int, layer: str, pos_embed: str) -> None:
    if image_size <= 0 or image_size % patch_size:
        raise BackboneError(f"image_size must be a positive multiple of the patch size {patch_size}, got {image_size}")
    if layer not in LAYERS:
        raise BackboneError(f"layer must be one of {', '.join(LAYERS)}; got {layer!r}")
    if pos_embed not in POS_EMBED_MODES:
        raise BackboneError(f"pos_embed must be one of {', '.join(POS_EMBED_MODES)}; got {pos_embed!r}")


def _compute_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 autocast on CUDA (halves memory, ~2x faster on tensor cores); exact float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class DinoV2(Backbone):
    """DINOv2 ViT through timm; tokens of the last block before (``prenorm``) or after (``norm``) its norm."""

    patch_size = 14

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
        super().__init__(
            model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device, pos_embed=pos_embed
        )
        self.layer = layer
        # float(): a half-precision weights file still runs in float32 (autocast decides the compute dtype)
        network = self._build(model, weights).float()
        _set_canvas_size(network, image_size, pos_embed)
        self.model = network.to(self.device).eval().requires_grad_(False)
        self.dim = self.model.embed_dim
        self._dtype = _compute_dtype(device)

    @staticmethod
    def describe(
        model: str,
        *,
        weights: str,
        image_size: int,
        layer: str,
        flip: bool,
        device: str | torch.device,
        pos_embed: str = "dinov2",
    ) -> dict[str, Any]:
        """Validate the options and return the key parameters, without loading anything."""
        _check_options(image_size, DinoV2.patch_size, layer, pos_embed)
        identity = _weights_identity(weights)
        if identity == "hub":
            identity = "hub:" + model.split(".", 1)[1]
        return {
            "model": model,
            "weights": identity,
            "image_size": image_size,
            "layer": layer,
            "pos_embed": pos_embed,
            "normalisation": "imagenet",
            "compute_dtype": str(_compute_dtype(device)).removeprefix("torch."),
            "flip": flip,
        }

    def _build(self, model: str, weights: str) -> torch.nn.Module:
        """The network at its weights' own grid (timm's default size for random weights), not yet resampled."""
        if self.random_weights:
            with torch.random.fork_rng(devices=[]):  # a fixed init that leaves the caller's RNG alone
                torch.manual_seed(int(self._params["weights"].removeprefix("random:")))
                return timm.create_model(model, pretrained=False, num_classes=0)
        if weights == "hub":
            repo = timm.models.get_pretrained_cfg(model).hf_hub_id
            state, source = _download_hub_state_dict(model, repo), f"hub:{repo}"
        else:
            path = Path(weights).expanduser()
            state, source = _read_weights_file(path), str(path)
        # Built at the checkpoint's grid, so that loading resamples nothing: _set_canvas_size does it once.
        grid = _checkpoint_grid(state)
        size = {} if grid is None else {"img_size": grid * self.patch_size}
        with torch.device("meta"):  # no wasted random init: every tensor comes from the checkpoint
            network = timm.create_model(model, pretrained=False, num_classes=0, **size)
        _load_state_dict(network, state, source=source, model=model)
        return network

    def _tokens(self, canvases: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self._dtype, enabled=self._dtype != torch.float32):
            (tokens,) = self.model.forward_intermediates(
                canvases, indices=1, norm=self.layer == "norm", output_fmt="NLC", intermediates_only=True
            )
        return tokens.float().reshape(len(canvases), self.grid_size, self.grid_size, self.dim)


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
    native = network.pos_embed.detach()
    n_prefix = 0 if network.no_embed_class else network.num_prefix_tokens  # class position of plain models
    network.set_input_size(img_size=image_size)
    if pos_embed == "dinov2":
        (grid, _) = network.patch_embed.grid_size
        patches = dinov2_pos_embed(native[:, n_prefix:], grid, registers=network.num_reg_tokens > 0)
        network.pos_embed = torch.nn.Parameter(torch.cat([native[:, :n_prefix], patches], dim=1), requires_grad=False)


def _download_hub_state_dict(model: str, repo: str) -> dict[str, torch.Tensor]:
    """timm's pretrained state dict of ``model`` from the Hugging Face hub (or its local cache)."""
    try:
        return load_state_dict_from_hf(repo, weights_only=True)
    except OSError as error:  # huggingface_hub's connection, offline and not-found errors are all OSErrors
        url = timm.models.get_pretrained_cfg(model).url
        raise WeightsUnavailableError(
            f"the weights of {model} could not be downloaded from the Hugging Face hub ({repo}): {error}. "
            f"Fetch them on a machine with internet access (e.g. the original checkpoint {url}) and point "
            f"this backbone's `weights:` in the catalog at the local .pth/.safetensors file; set "
            f"HF_HUB_OFFLINE=1 to fail fast when offline."
        ) from error


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in a ``.safetensors`` or ``.pth`` file."""
    try:
        return load_state_dict(str(path), use_ema=False)
    except Exception as error:  # torch and safetensors raise many types on unreadable files
        raise BackboneError(f"{path}: cannot read the weights file: {error}") from error


def _load_state_dict(network: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, model: str) -> None:
    """Load a timm- or original-DINOv2-layout state dict into ``network``; name ``source`` on any mismatch.

    timm's ``checkpoint_filter_fn`` converts the original layout (the network is built at the checkpoint's
    grid, so it resamples nothing).
    """
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
    network.load_state_dict(state, assign=True)


class Daisy(Backbone):
    """Weights-free DAISY descriptors (skimage) on the grey canvas, one per patch centre, L2-normalised.

    The descriptor radius is one patch (14 px), so each descriptor sees a disc two patches wide; rings=2,
    histograms=6, orientations=8 give C = (2 * 6 + 1) * 8 = 104. Deterministic; about 300 MB of transient
    memory per 840-px canvas (skimage computes the descriptor at every pixel before subsampling).
    """

    patch_size = 14
    radius = 14
    rings = 2
    histograms = 6
    orientations = 8
    dim = (rings * histograms + 1) * orientations

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
        super().__init__(
            model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device, pos_embed=pos_embed
        )
        centres = CanvasTransform.fit(image_size, image_size, image_size, self.patch_size).patch_centres()
        self._first_centre = int(np.floor(centres[0, 0, 0]))
        self._subpixel = float(centres[0, 0, 0] - self._first_centre)

    @staticmethod
    def describe(
        model: str,
        *,
        weights: str,
        image_size: int,
        layer: str,
        flip: bool,
        device: str | torch.device,
        pos_embed: str = "dinov2",
    ) -> dict[str, Any]:
        """Validate the options and return the key parameters (``layer``, ``pos_embed`` do not apply: not recorded)."""
        _check_options(image_size, Daisy.patch_size, layer, pos_embed)
        if weights not in ("none", "hub"):
            raise BackboneError(f"daisy has no weights: weights must be 'none' (or the default 'hub'), got {weights!r}")
        return {
            "model": model,
            "weights": "none",
            "image_size": image_size,
            "radius": Daisy.radius,
            "rings": Daisy.rings,
            "histograms": Daisy.histograms,
            "orientations": Daisy.orientations,
            "normalisation": "imagenet",
            "compute_dtype": "float32",
            "flip": flip,
        }

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


_REGISTRY: dict[str, type[Backbone]] = {name: DinoV2 for name in DINOV2_MODELS} | {"daisy": Daisy}
BACKBONE_NAMES = tuple(_REGISTRY)


def _backbone_class(model: str) -> type[Backbone]:
    if model not in _REGISTRY:
        raise BackboneError(f"unknown backbone model {model!r}; valid names: {', '.join(BACKBONE_NAMES)}")
    return _REGISTRY[model]


def backbone_key_params(
    model: str,
    *,
    weights: str,
    image_size: int,
    layer: str,
    flip: bool,
    device: str | torch.device = "cpu",
    pos_embed: str = "dinov2",
) -> dict[str, Any]:
    """``key_params()`` of the backbone ``create_backbone`` would build, without loading any model.

    For the driver, which names the feature store before workers load the model; a local weights file is
    hashed (sha256, cached per file size and mtime). ``device`` matters: CUDA computes in bfloat16.
    """
    return _backbone_class(model).describe(
        model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device, pos_embed=pos_embed
    )


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
    """Build the backbone called ``model`` (a timm DINOv2 name verbatim, or ``daisy``) on ``device``.

    ``pos_embed`` (DINOv2): ``dinov2`` resamples the position embedding as the original DINOv2 code does,
    ``timm`` as timm does.
    """
    return _backbone_class(model)(
        model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device, pos_embed=pos_embed
    )
