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

The model is built for the canvas size (``img_size=S``): the position embedding is resampled once, at
load time, with timm's bicubic interpolation from the checkpoint's grid (37 x 37 for DINOv2) to S / 14.
Hub and file weights are loaded into a model built on the meta device, skipping a random initialisation
that would take minutes for ViT-g on a CPU. On CUDA the forward pass runs under bfloat16 autocast (half
the memory, tensor cores); on every other device in float32. The compute dtype is a key parameter.
"""

from __future__ import annotations

import functools
import hashlib
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
        self, model: str, *, weights: str, image_size: int, layer: str, flip: bool, device: str | torch.device
    ):
        self._params = self.describe(
            model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device
        )
        self.image_size = image_size
        self.flip = flip
        self.random_weights = self._params["weights"].startswith("random")
        self.device = torch.device(device)

    @staticmethod
    @abstractmethod
    def describe(
        model: str, *, weights: str, image_size: int, layer: str, flip: bool, device: str | torch.device
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


def _check_options(image_size: int, patch_size: int, layer: str) -> None:
    if image_size <= 0 or image_size % patch_size:
        raise BackboneError(f"image_size must be a positive multiple of the patch size {patch_size}, got {image_size}")
    if layer not in LAYERS:
        raise BackboneError(f"layer must be one of {', '.join(LAYERS)}; got {layer!r}")


def _compute_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 autocast on CUDA (halves memory, ~2x faster on tensor cores); exact float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class DinoV2(Backbone):
    """DINOv2 ViT through timm; tokens of the last block before (``prenorm``) or after (``norm``) its norm."""

    patch_size = 14

    def __init__(
        self, model: str, *, weights: str, image_size: int, layer: str, flip: bool, device: str | torch.device
    ):
        super().__init__(model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device)
        self.layer = layer
        # float(): a half-precision weights file still runs in float32 (autocast decides the compute dtype)
        network = self._build(model, weights, image_size).float()
        self.model = network.to(self.device).eval().requires_grad_(False)
        self.dim = self.model.embed_dim
        self._dtype = _compute_dtype(device)

    @staticmethod
    def describe(
        model: str, *, weights: str, image_size: int, layer: str, flip: bool, device: str | torch.device
    ) -> dict[str, Any]:
        """Validate the options and return the key parameters, without loading anything."""
        _check_options(image_size, DinoV2.patch_size, layer)
        identity = _weights_identity(weights)
        if identity == "hub":
            identity = "hub:" + model.split(".", 1)[1]
        return {
            "model": model,
            "weights": identity,
            "image_size": image_size,
            "layer": layer,
            "normalisation": "imagenet",
            "compute_dtype": str(_compute_dtype(device)).removeprefix("torch."),
            "flip": flip,
        }

    def _build(self, model: str, weights: str, image_size: int) -> torch.nn.Module:
        options = {"img_size": image_size, "num_classes": 0}
        if self.random_weights:
            with torch.random.fork_rng(devices=[]):  # a fixed init that leaves the caller's RNG alone
                torch.manual_seed(int(self._params["weights"].removeprefix("random:")))
                return timm.create_model(model, pretrained=False, **options)
        with torch.device("meta"):  # no wasted random init: every tensor comes from the checkpoint
            network = timm.create_model(model, pretrained=False, **options)
        if weights == "hub":
            repo = timm.models.get_pretrained_cfg(model).hf_hub_id
            _load_state_dict(network, _download_hub_state_dict(model, repo), source=f"hub:{repo}", model=model)
        else:
            path = Path(weights).expanduser()
            _load_state_dict(network, _read_weights_file(path), source=str(path), model=model)
        return network

    def _tokens(self, canvases: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self._dtype, enabled=self._dtype != torch.float32):
            (tokens,) = self.model.forward_intermediates(
                canvases, indices=1, norm=self.layer == "norm", output_fmt="NLC", intermediates_only=True
            )
        return tokens.float().reshape(len(canvases), self.grid_size, self.grid_size, self.dim)


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

    timm's ``checkpoint_filter_fn`` converts the original layout and resamples the position embedding to
    the network's grid.
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
        self, model: str, *, weights: str, image_size: int, layer: str, flip: bool, device: str | torch.device
    ):
        super().__init__(model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device)
        centres = CanvasTransform.fit(image_size, image_size, image_size, self.patch_size).patch_centres()
        self._first_centre = int(np.floor(centres[0, 0, 0]))
        self._subpixel = float(centres[0, 0, 0] - self._first_centre)

    @staticmethod
    def describe(
        model: str, *, weights: str, image_size: int, layer: str, flip: bool, device: str | torch.device
    ) -> dict[str, Any]:
        """Validate the options and return the key parameters (``layer`` does not apply: not recorded)."""
        _check_options(image_size, Daisy.patch_size, layer)
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
    model: str, *, weights: str, image_size: int, layer: str, flip: bool, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """``key_params()`` of the backbone ``create_backbone`` would build, without loading any model.

    For the driver, which names the feature store before workers load the model; a local weights file is
    hashed (sha256, cached per file size and mtime). ``device`` matters: CUDA computes in bfloat16.
    """
    return _backbone_class(model).describe(
        model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device
    )


def create_backbone(
    model: str, *, weights: str, image_size: int, layer: str, flip: bool, device: str | torch.device = "cpu"
) -> Backbone:
    """Build the backbone called ``model`` (a timm DINOv2 name verbatim, or ``daisy``) on ``device``."""
    return _backbone_class(model)(model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device)
