"""What names a backbone's features, without loading a model: model names, options and the store key parameters.

The driver names feature stores (and ``pipeline status`` finds them) with ``backbone_key_params``; this
module imports neither torch nor timm for DINOv2 and DAISY, so those commands answer at once. Any other
timm model is looked up in timm (imported on demand) for its patch size and normalisation.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.cache import stable_hash
from pipeline.errors import PipelineError

DAISY = "daisy"
DINOV2_MODELS = tuple(
    f"vit_{size}_patch14_{variant}dinov2.lvd142m"
    for variant in ("", "reg4_")
    for size in ("small", "base", "large", "giant")
)
DINOV2_PATCH_SIZE = 14
_DINOV2_NAME = re.compile(r"vit_(small|base|large|giant)_patch14_(reg4_)?dinov2(\.lvd142m)?")
LAYERS = ("prenorm", "norm")
POS_EMBED_MODES = ("dinov2", "timm")  # how the position embedding is resampled to the canvas
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DAISY_PATCH_SIZE = 14
DAISY_SHAPE = {"radius": 14, "rings": 2, "histograms": 6, "orientations": 8}  # the descriptor's layout


class BackboneError(PipelineError):
    """A backbone cannot be built: an unknown name, an invalid option or an unusable weights file."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights could not be downloaded from the Hugging Face hub (or found in its cache)."""


def is_dinov2(model: str) -> bool:
    """Whether ``model`` names a DINOv2 ViT (plain or ``reg4``), with or without timm's ``.lvd142m`` tag."""
    return _DINOV2_NAME.fullmatch(model) is not None


def has_registers(model: str) -> bool:
    """Whether a DINOv2 ``model`` is a register (``reg4``) model."""
    return "_reg4_" in model


def compute_dtype(device: str | Any) -> str:
    """``bfloat16`` autocast on CUDA (halves memory, ~2x faster on tensor cores); exact ``float32`` elsewhere."""
    return "bfloat16" if str(device).split(":")[0] == "cuda" else "float32"


class TimmInfo(NamedTuple):
    """What the driver needs to know of a timm ViT: its patch size, input normalisation and hub weights."""

    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tag: str  # the pretrained tag (``lvd142m``): the hub weights' identity
    hub_repo: str | None  # where timm fetches the pretrained weights on the Hugging Face hub, if anywhere
    hub_filename: str | None  # the file there, when not timm's default
    url: str  # where the weights were first published (for the error that says how to use a local file)


@functools.lru_cache(maxsize=64)
def timm_vit(model: str) -> TimmInfo:
    """What timm says of the ViT named ``model`` (timm is imported and the model built on the meta device);
    raises BackboneError for a name timm does not know or a model without a patch grid."""
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(model) or ("." in model and model not in timm.list_pretrained(model.split(".")[0] + ".*")):
        close = difflib.get_close_matches(model, timm.list_pretrained() + list(DINOV2_MODELS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_pretrained('*pattern*')` lists them"
        raise BackboneError(f"unknown backbone model {model!r}: neither {DAISY!r} nor a model timm knows{hint}")
    with torch.device("meta"):
        network = timm.create_model(model, pretrained=False, num_classes=0)
    patch = network.patch_embed.patch_size if isinstance(network, VisionTransformer) else None
    if patch is None or patch[0] != patch[1]:
        raise BackboneError(
            f"backbone model {model!r} is a {type(network).__name__}, not a ViT with square patches; "
            f"its features would not form a patch grid"
        )
    config = network.pretrained_cfg
    return TimmInfo(
        patch_size=patch[0],
        mean=tuple(config.get("mean", IMAGENET_MEAN)),
        std=tuple(config.get("std", IMAGENET_STD)),
        tag=config.get("tag") or "",
        hub_repo=config.get("hf_hub_id") or None,
        hub_filename=config.get("hf_hub_filename") or None,
        url=config.get("url") or "",
    )


def patch_size(model: str) -> int:
    """The patch size of the backbone ``model`` (14 for DINOv2 and DAISY, timm's for any other ViT)."""
    if model == DAISY:
        return DAISY_PATCH_SIZE
    return DINOV2_PATCH_SIZE if is_dinov2(model) else timm_vit(model).patch_size


def _normalisation(model: str) -> str | dict[str, list[float]]:
    """``imagenet`` or the model's own ``{mean, std}``: the canvas is renormalised to what it was trained on."""
    if is_dinov2(model):
        return "imagenet"
    vit = timm_vit(model)
    if (vit.mean, vit.std) == (IMAGENET_MEAN, IMAGENET_STD):
        return "imagenet"
    return {"mean": list(vit.mean), "std": list(vit.std)}  # lists: equal to the store's JSON attributes


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


def weights_identity(weights: str) -> str:
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


def hub_source(model: str) -> tuple[str, str | None, str]:
    """``(repo, filename or None, original url)`` of ``model``'s pretrained weights; for DINOv2 without
    importing timm (its pretrained configs name ``timm/<model>.lvd142m`` and the facebookresearch files)."""
    if is_dinov2(model):
        size = model.split("_")[1][0]  # s, b, l, g
        registers = "_reg4" if has_registers(model) else ""
        url = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/dinov2_vit{size}14{registers}_pretrain.pth"
        return f"timm/{model.split('.')[0]}.lvd142m", None, url
    _hub_tag(model)  # raises when there are no hub weights
    vit = timm_vit(model)
    return vit.hub_repo, vit.hub_filename, vit.url


def _hub_tag(model: str) -> str:
    """The pretrained tag of ``model``'s hub weights; raises when timm has none on the hub."""
    if is_dinov2(model):
        return "lvd142m"
    vit = timm_vit(model)
    if vit.hub_repo is None:
        raise BackboneError(
            f"timm has no Hugging Face hub weights for {model!r}; set this backbone's `weights:` to a "
            f"local .pth/.safetensors file (or name a tagged model, e.g. {model.split('.')[0]}.<tag>)"
        )
    return vit.tag


def _check_options(model: str, image_size: int, layer: str, pos_embed: str) -> None:
    patch = patch_size(model)
    if image_size <= 0 or image_size % patch:
        raise BackboneError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size}")
    if layer not in LAYERS:
        raise BackboneError(f"layer must be one of {', '.join(LAYERS)}; got {layer!r}")
    if pos_embed not in POS_EMBED_MODES:
        raise BackboneError(f"pos_embed must be one of {', '.join(POS_EMBED_MODES)}; got {pos_embed!r}")


def _vit_key_params(
    model: str, *, weights: str, image_size: int, layer: str, flip: bool, device: str | Any, pos_embed: str
) -> dict[str, Any]:
    _check_options(model, image_size, layer, pos_embed)
    if pos_embed == "dinov2" and not is_dinov2(model):
        raise BackboneError(
            f"pos_embed: dinov2 resamples the position embedding as the original DINOv2 code does, and "
            f"{model!r} is not a DINOv2 model; set pos_embed: timm for it"
        )
    identity = weights_identity(weights)
    if identity == "hub":
        identity = "hub:" + _hub_tag(model)
    return {
        "model": model,
        "weights": identity,
        "image_size": image_size,
        "layer": layer,
        "pos_embed": pos_embed,
        "normalisation": _normalisation(model),
        "compute_dtype": compute_dtype(device),
        "flip": flip,
    }


def _daisy_key_params(
    model: str, *, weights: str, image_size: int, layer: str, flip: bool, device: str | Any, pos_embed: str
) -> dict[str, Any]:
    """``layer`` and ``pos_embed`` do not apply to DAISY: checked, not recorded."""
    _check_options(model, image_size, layer, pos_embed)
    if weights not in ("none", "hub"):
        raise BackboneError(f"daisy has no weights: weights must be 'none' (or the default 'hub'), got {weights!r}")
    return {
        "model": model,
        "weights": "none",
        "image_size": image_size,
        **DAISY_SHAPE,
        "normalisation": "imagenet",
        "compute_dtype": "float32",
        "flip": flip,
    }


def backbone_key_params(
    model: str,
    *,
    weights: str,
    image_size: int,
    layer: str,
    flip: bool,
    device: str | Any = "cpu",
    pos_embed: str = "dinov2",
) -> dict[str, Any]:
    """The key parameters of the backbone ``create_backbone`` would build (everything that changes its
    numbers), without loading any model; raises BackboneError for an invalid name or option.

    For the driver, which names the feature store before workers load the model; a local weights file is
    hashed (sha256, cached per file size and mtime). ``device`` matters: CUDA computes in bfloat16.
    """
    describe = _daisy_key_params if model == DAISY else _vit_key_params
    return describe(
        model, weights=weights, image_size=image_size, layer=layer, flip=flip, device=device, pos_embed=pos_embed
    )
