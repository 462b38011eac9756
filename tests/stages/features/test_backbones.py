"""Tests of the patch-feature backbones: shapes, layers, key parameters, weights files, hub errors, DAISY."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from stages.features.backbone_keys import hub_source, is_dinov2
from stages.features.backbones import (
    DINOV2_MODELS,
    BackboneError,
    backbone_key_params,
    check_weights,
    create_backbone,
)
from stages.features.canvas import IMAGENET_MEAN, IMAGENET_STD, CanvasTransform, image_to_canvas

REPO = Path(__file__).resolve().parents[3]
SMALL = "vit_small_patch14_dinov2.lvd142m"
SMALL_REG4 = "vit_small_patch14_reg4_dinov2.lvd142m"
BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
    "mlp.fc2.bias", "ls2.gamma",
)  # fmt: skip


def canvases(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Random normalised canvases [batch, 3, size, size]."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_vit(model: str = SMALL, *, layer: str = "prenorm", size: int = 56):
    return create_backbone(model, weights="random", image_size=size, layer=layer, flip=False)


def scrambled(backbone):
    """A copy of a random ViT whose every weight matters: layer scales near 1, so a misloaded block shows."""
    backbone = copy.deepcopy(backbone)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in backbone.model.named_parameters():
            centre = 1.0 if name.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight")) else 0.0
            parameter.copy_(centre + 0.1 * torch.randn(parameter.shape, generator=generator))
    return backbone


def to_original_layout(state: dict[str, torch.Tensor], *, depth: int) -> dict[str, torch.Tensor]:
    """The facebookresearch/dinov2 checkpoint layout of a timm DINOv2 state dict, written out key by key."""
    original = {
        "patch_embed.proj.weight": state["patch_embed.proj.weight"],
        "patch_embed.proj.bias": state["patch_embed.proj.bias"],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
        "mask_token": torch.zeros(1, state["cls_token"].shape[-1]),
    }
    for block in range(depth):
        for name in BLOCK_KEYS:
            original[f"blocks.{block}.{name}"] = state[f"blocks.{block}.{name}"]
    if "reg_token" in state:
        # The original adds a class position to the class token; timm folds it into cls_token.
        class_position = torch.randn(1, 1, state["cls_token"].shape[-1])
        original["register_tokens"] = state["reg_token"]
        original["cls_token"] = state["cls_token"] - class_position
        original["pos_embed"] = torch.cat([class_position, state["pos_embed"]], dim=1)
    else:
        original["cls_token"] = state["cls_token"]
        original["pos_embed"] = state["pos_embed"]
    copied = {key for key in state if key in original} | {"reg_token"} & set(state)
    assert copied == set(state), f"keys left out of the conversion: {set(state) - copied}"
    return original


@pytest.fixture(scope="module")
def small():
    return random_vit(SMALL)


@pytest.fixture(scope="module")
def reg4():
    return random_vit(SMALL_REG4)


@pytest.fixture(scope="module")
def x56():
    return canvases(56)


@pytest.fixture(scope="module")
def small_source(small, x56):
    """A scrambled ViT-S/14 at canvas 56, its prenorm and norm tokens of ``x56``."""
    source = scrambled(small)
    with torch.inference_mode():
        normed = source.model.forward_features(x56)[:, 1:].reshape(2, 4, 4, 384)
    return source, source(x56), normed


@pytest.fixture(scope="module")
def reg4_source(reg4, x56):
    source = scrambled(reg4)
    with torch.inference_mode():
        normed = source.model.forward_features(x56)[:, 5:].reshape(2, 4, 4, 384)
    return source, source(x56), normed


def test_dinov2_names_are_timms_own():
    assert set(DINOV2_MODELS) == {name for name in timm.list_pretrained("*dinov2*") if is_dinov2(name)}
    assert len(DINOV2_MODELS) == 8 and all(is_dinov2(name.split(".")[0]) for name in DINOV2_MODELS)
    assert not is_dinov2("vit_small_patch16_224.augreg_in21k") and not is_dinov2("daisy")
    for name in DINOV2_MODELS:  # named without importing timm, so that offline errors come at once
        config = timm.models.get_pretrained_cfg(name)
        assert hub_source(name) == hub_source(name.split(".")[0]) == (config.hf_hub_id, None, config.url)


def test_random_vit_tokens_have_the_patch_grid_shape(small, reg4, x56):
    for backbone, x in ((small, x56), (reg4, x56), (random_vit(size=112), canvases(112, batch=1))):
        tokens = backbone(x)
        size = x.shape[-1]
        assert (backbone.patch_size, backbone.dim, backbone.grid_size) == (14, 384, size // 14)
        assert tokens.shape == (len(x), size // 14, size // 14, 384) and tokens.dtype == torch.float32
        assert backbone.random_weights and backbone.key_params()["weights"] == "random:0"
        assert "-RANDOM-" in backbone.key()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_file_reproduces_the_saving_model(small_source, x56, tmp_path, suffix):
    source, prenorm, normed = small_source
    path = tmp_path / f"vits14{suffix}"
    state = source.model.state_dict()
    safetensors.torch.save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    layer = "prenorm" if suffix == ".pth" else "norm"
    loaded = create_backbone(SMALL, weights=str(path), image_size=56, layer=layer, flip=False)
    torch.testing.assert_close(loaded(x56), prenorm if layer == "prenorm" else normed, rtol=0, atol=0)
    assert not loaded.random_weights and "RANDOM" not in loaded.key()


def test_prenorm_is_the_last_block_before_the_final_norm(small_source):
    source, prenorm, normed = small_source
    with torch.inference_mode():
        torch.testing.assert_close(source.model.norm(prenorm), normed)
    assert not torch.allclose(prenorm, normed, atol=1e-2)


def test_flipped_tokens_are_those_of_the_mirrored_canvas_on_the_original_grid(small):
    x = canvases(56, batch=1)
    mirrored = small(torch.from_numpy(x.numpy()[..., ::-1].copy())).numpy()
    flipped = small.flipped(x)
    torch.testing.assert_close(flipped, torch.from_numpy(mirrored[:, :, ::-1].copy()))
    assert not torch.allclose(flipped, torch.from_numpy(mirrored))


def test_key_params_change_with_everything_that_changes_the_numbers(small, tmp_path):
    weights_a, weights_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(2)}, weights_a)
    safetensors.torch.save_file({"x": torch.ones(2)}, weights_b)
    base = {"weights": "random", "image_size": 56, "layer": "prenorm", "flip": False, "device": "cpu"}
    variants = [
        {}, {"weights": "random:1"}, {"weights": str(weights_a)}, {"weights": str(weights_b)},
        {"weights": "hub"}, {"image_size": 112}, {"layer": "norm"}, {"flip": True}, {"device": "cuda"},
        {"pos_embed": "timm"},
    ]  # fmt: skip
    keys = [backbone_key_params(SMALL, **(base | change)) for change in variants]
    keys.append(backbone_key_params(SMALL_REG4, **base))
    keys.append(backbone_key_params("daisy", **(base | {"weights": "none"})))
    assert len({repr(sorted(k.items())) for k in keys}) == len(keys)
    assert backbone_key_params(SMALL, **base) == backbone_key_params(SMALL, **(base | {"weights": "random:0"}))
    assert keys[2]["weights"].startswith("sha256:") and keys[4]["weights"] == "hub:lvd142m"
    assert keys[0]["pos_embed"] == "dinov2" and "pos_embed" not in keys[-1]  # DAISY has no position embedding
    assert keys[-4]["compute_dtype"] == "bfloat16" and keys[0]["compute_dtype"] == "float32"
    assert small.key_params() == keys[0]


@pytest.mark.parametrize("which", ["plain", "reg4"])
def test_original_dinov2_layout_reproduces_the_saving_model(small_source, reg4_source, x56, tmp_path, which):
    (source, _, normed), model = (small_source, SMALL) if which == "plain" else (reg4_source, SMALL_REG4)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(to_original_layout(source.model.state_dict(), depth=12), path)
    loaded = create_backbone(model, weights=str(path), image_size=56, layer="norm", flip=False)
    torch.testing.assert_close(loaded(x56), normed, rtol=1e-5, atol=1e-5)
    # A canvas of another size resamples the position embedding from the file's 4 x 4 grid.
    larger = create_backbone(model, weights=str(path), image_size=112, layer="norm", flip=False)
    assert larger.model.pos_embed.shape[1] == larger.model.num_prefix_tokens * (which == "plain") + 8 * 8
    assert larger(canvases(112, batch=1)).shape == (1, 8, 8, 384)


DINOV2_GRID = 37  # the original DINOv2 checkpoints' 518 px / 14


def expected_patch_pos_embed(patch_pos_embed: torch.Tensor, grid: int, *, registers: bool) -> torch.Tensor:
    """The original DINOv2 ``interpolate_pos_encoding`` of a 37 x 37 patch embedding [1, 1369, C], from its
    formula: plain models bicubic by scale factor (grid + 0.1) / 37 without antialiasing, register models
    bicubic to the size grid with antialiasing; untouched at grid 37."""
    if grid == DINOV2_GRID:
        return patch_pos_embed
    square = patch_pos_embed.reshape(1, DINOV2_GRID, DINOV2_GRID, -1).permute(0, 3, 1, 2)
    if registers:
        resampled = F.interpolate(square, size=(grid, grid), mode="bicubic", antialias=True)
    else:
        scale = (grid + 0.1) / DINOV2_GRID
        resampled = F.interpolate(square, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    return resampled.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


def timm_random_pos_embed(model: str, seed: int = 0) -> torch.Tensor:
    """The position embedding of timm's random initialisation of ``model`` at its own 518 px (37 x 37)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(model, pretrained=False, num_classes=0).pos_embed.detach()


@pytest.mark.slow
@pytest.mark.parametrize("model", [SMALL, SMALL_REG4])
def test_position_embedding_is_resampled_as_the_original_dinov2_code(model):
    registers = model == SMALL_REG4
    native = timm_random_pos_embed(model)
    n_prefix = 0 if registers else 1  # the plain model's embedding starts with the class position
    assert native.shape[1] == n_prefix + DINOV2_GRID**2
    for size in (518, 448, 840):
        grid = size // 14
        pos_embed = random_vit(model, size=size).model.pos_embed.detach()
        expected = torch.cat(
            [native[:, :n_prefix], expected_patch_pos_embed(native[:, n_prefix:], grid, registers=registers)], dim=1
        )
        assert pos_embed.shape == (1, n_prefix + grid * grid, 384)
        torch.testing.assert_close(pos_embed, expected, rtol=0, atol=0)
    assert torch.equal(random_vit(model, size=518).model.pos_embed, native)  # 518 px: untouched


@pytest.mark.parametrize("model", [SMALL, SMALL_REG4])
def test_timm_position_embedding_is_timms_antialiased_resize(model):
    registers = model == SMALL_REG4
    n_prefix = 0 if registers else 1
    native = timm_random_pos_embed(model)[:, n_prefix:].reshape(1, DINOV2_GRID, DINOV2_GRID, -1)
    timms = create_backbone(model, weights="random", image_size=840, layer="prenorm", flip=False, pos_embed="timm")
    resized = F.interpolate(native.permute(0, 3, 1, 2), size=(60, 60), mode="bicubic", antialias=True)
    torch.testing.assert_close(timms.model.pos_embed[:, n_prefix:], resized.permute(0, 2, 3, 1).reshape(1, 3600, -1))
    dinov2 = random_vit(model, size=840)
    # timm resamples register models as the original does, plain models not (no 0.1 offset, antialiased).
    assert torch.equal(timms.model.pos_embed, dinov2.model.pos_embed) == registers
    assert (timms.key_params()["pos_embed"], dinov2.key_params()["pos_embed"]) == ("timm", "dinov2")
    assert timms.key() != dinov2.key()


def original_dinov2_tokens(state: dict[str, torch.Tensor], x: torch.Tensor, *, heads: int) -> torch.Tensor:
    """The original DINOv2 code's ``get_intermediate_layers(x, 1, norm=False)`` patch tokens [B, Hp, Wp, C]
    of canvases x, computed from a checkpoint in its own layout with the formulas of the paper's ViT:
    patch embedding, class token, resampled position embedding, register tokens, pre-norm blocks with
    layer scale (LayerNorm eps 1e-6, softmax attention, GELU MLP)."""
    batch, dim = len(x), state["cls_token"].shape[-1]
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    grid = tokens.shape[-1]
    tokens = torch.cat([state["cls_token"].expand(batch, -1, -1), tokens.flatten(2).transpose(1, 2)], dim=1)
    registers = state.get("register_tokens", torch.zeros(1, 0, dim))
    patch_pos_embed = expected_patch_pos_embed(state["pos_embed"][:, 1:], grid, registers=len(registers[0]) > 0)
    tokens = tokens + torch.cat([state["pos_embed"][:, :1], patch_pos_embed], dim=1)
    tokens = torch.cat([tokens[:, :1], registers.expand(batch, -1, -1), tokens[:, 1:]], dim=1)
    n_tokens = tokens.shape[1]
    for block in range(sum(key.endswith(".ls1.gamma") for key in state)):
        p = {key.removeprefix(f"blocks.{block}."): value for key, value in state.items()}
        h = F.layer_norm(tokens, (dim,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, n_tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attention = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(batch, n_tokens, dim)
        tokens = tokens + p["ls1.gamma"] * F.linear(h, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(tokens, (dim,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"]
        )
        tokens = tokens + p["ls2.gamma"] * h
    return tokens[:, 1 + len(registers[0]) :].reshape(batch, grid, grid, dim)


@pytest.mark.slow
@pytest.mark.parametrize("model", [SMALL, SMALL_REG4])
def test_original_checkpoint_at_840_px_gives_the_original_codes_tokens(model, tmp_path):
    source = scrambled(random_vit(model, size=518))
    state = to_original_layout(source.model.state_dict(), depth=12)
    assert state["pos_embed"].shape[1] == 1 + DINOV2_GRID**2
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    x = canvases(840, batch=1)
    loaded = create_backbone(model, weights=str(path), image_size=840, layer="prenorm", flip=False)
    tokens = loaded(x)
    with torch.inference_mode():
        expected = original_dinov2_tokens(state, x, heads=6)
    assert tokens.shape == expected.shape == (1, 60, 60, 384)
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_weights_file_with_a_wrong_key_names_the_file_and_the_key(small, tmp_path):
    state = dict(small.model.state_dict())
    state["blocks.0.norm_1.weight"] = state.pop("blocks.0.norm1.weight")
    path = tmp_path / "renamed.safetensors"
    safetensors.torch.save_file(state, path)
    pattern = re.escape(str(path)) + r".*missing keys: blocks\.0\.norm1\.weight; unexpected keys: blocks\.0\.norm_1"
    with pytest.raises(BackboneError, match=pattern):
        create_backbone(SMALL, weights=str(path), image_size=56, layer="prenorm", flip=False)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=re.escape(str(garbage)) + ": cannot read the weights file"):
        create_backbone(SMALL, weights=str(garbage), image_size=56, layer="prenorm", flip=False)


def hub_attempt(env: dict[str, str], tmp_path: Path, call: str) -> subprocess.CompletedProcess:
    """Run ``call`` (hub weights of ViT-S/14) in a fresh interpreter, with an empty Hugging Face cache and
    ``env``: huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT at import."""
    script = (
        "from stages.features.backbones import WeightsUnavailableError, check_weights, create_backbone\n"
        "try:\n"
        f"    {call}\n"
        "except WeightsUnavailableError as error:\n"
        "    print(error)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    environ = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=REPO, env=environ
    )


HOW_TO_USE_A_FILE = (
    rf"the weights of {re.escape(SMALL)} could not be downloaded .*dinov2_vits14_pretrain\.pth.*"
    r"point this backbone's `weights:` in the catalog at the local \.pth/\.safetensors file"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "the hub cannot be reached"),
    ],
)
@pytest.mark.parametrize("call", ["check_weights", "create_backbone"])
def test_hub_weights_offline_raise_at_once_an_error_that_says_how_to_use_a_local_file(tmp_path, env, reason, call):
    # One probe without retries when the hub is unreachable (huggingface_hub itself retries for ~50 s).
    code = {
        "check_weights": f"check_weights({SMALL!r}, 'hub')",
        "create_backbone": f"create_backbone({SMALL!r}, weights='hub', image_size=56, layer='prenorm', flip=False)",
    }[call]
    result = hub_attempt(env, tmp_path, code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(HOW_TO_USE_A_FILE, result.stdout) and reason in result.stdout
    assert "Retrying" not in result.stderr


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_check_weights_accepts_a_fitting_file_and_names_the_key_of_one_that_does_not(small, tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    state = dict(small.model.state_dict())
    if suffix == ".pth":
        torch.save(to_original_layout(state, depth=12), good)  # the original DINOv2 layout
    else:
        safetensors.torch.save_file(state, good)
    check_weights(SMALL, str(good))
    check_weights(SMALL_REG4, "random")
    check_weights("daisy", "none")
    state["blocks.3.mlp.fc1.weight"] = state["blocks.3.mlp.fc1.weight"][:10]
    bad = tmp_path / f"bad{suffix}"
    torch.save(state, bad) if suffix == ".pth" else safetensors.torch.save_file(state, bad)
    with pytest.raises(BackboneError, match=re.escape(str(bad)) + r".*keys of the wrong shape: blocks\.3\.mlp\.fc1"):
        check_weights(SMALL, str(bad))
    with pytest.raises(BackboneError, match=r"not a state dict of vit_small_patch14_reg4.*missing keys: reg_token"):
        check_weights(SMALL_REG4, str(good))
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=re.escape(str(garbage)) + ": cannot read the weights file"):
        check_weights(SMALL, str(garbage))


def test_any_timm_vit_is_a_backbone_on_its_own_patch_grid_and_normalisation():
    model = "vit_small_patch16_224.augreg_in21k"  # patch 16, trained on inputs normalised to mean = std = 0.5
    vit = create_backbone(model, weights="random", image_size=64, layer="prenorm", flip=False, pos_embed="timm")
    x = canvases(64)
    tokens = vit(x)
    assert (vit.patch_size, vit.grid_size) == (16, 4) and tokens.shape == (2, 4, 4, 384)
    params = vit.key_params()
    assert params["normalisation"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    assert params["pos_embed"] == "timm" and params["weights"] == "random:0"
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.inference_mode():
        (expected,) = vit.model.forward_intermediates(
            (x * std + mean - 0.5) / 0.5, indices=1, norm=False, output_fmt="NLC", intermediates_only=True
        )
    torch.testing.assert_close(tokens, expected.reshape(2, 4, 4, 384), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("vit_smal_patch14_dinov2.lvd142m", {}, r"unknown backbone model .*did you mean vit_small_patch14_dinov2"),
        ("vit_small_patch14_dinov2.in1k", {}, r"unknown backbone model 'vit_small_patch14_dinov2.in1k': neither"),
        ("resnet18.a1_in1k", {}, r"'resnet18.a1_in1k' is a ResNet, not a ViT with square patches"),
        ("vit_small_patch16_224.augreg_in21k", {"image_size": 64}, r"is not a DINOv2 model; set pos_embed: timm"),
        ("vit_small_patch16_224.augreg_in21k", {"pos_embed": "timm"}, r"multiple of the patch size 16, got 56"),
        (SMALL, {"layer": "last"}, r"layer must be one of prenorm, norm; got 'last'"),
        (SMALL, {"pos_embed": "bilinear"}, r"pos_embed must be one of dinov2, timm; got 'bilinear'"),
        (SMALL, {"image_size": 100}, r"image_size must be a positive multiple of the patch size 14, got 100"),
        (SMALL, {"weights": "hubb"}, r"weights must be 'hub', 'random'.*got 'hubb' \(no such file\)"),
        (SMALL, {"weights": "random:x"}, r"the seed after 'random:' must be a non-negative integer"),
        ("daisy", {"weights": "random"}, r"daisy has no weights"),
    ],
)  # fmt: skip
def test_invalid_options_are_rejected_with_the_valid_choices(model, options, message):
    settings = {"weights": "random", "image_size": 56, "layer": "prenorm", "flip": False} | options
    with pytest.raises(BackboneError, match=message):
        create_backbone(model, **settings)


def grey_canvas(grey: np.ndarray) -> torch.Tensor:
    """The normalised canvas [1, 3, S, S] of a grey image [S, S] in [0, 1]."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((torch.from_numpy(grey).float().expand(3, -1, -1) - mean) / std)[None]


def test_daisy_tokens_are_unit_deterministic_and_flat_on_padding():
    image = np.random.default_rng(0).integers(0, 256, size=(28, 168, 3), dtype=np.uint8)
    transform = CanvasTransform.fit(168, 28, canvas_size=168)  # 70 px of padding above and below
    canvas = image_to_canvas(image, transform)[None]
    daisy = create_backbone("daisy", weights="none", image_size=168, layer="prenorm", flip=False)
    tokens = daisy(canvas)
    assert tokens.shape == (1, 12, 12, 104) and daisy.dim == 104 and not daisy.random_weights
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(1, 12, 12))
    again = create_backbone("daisy", weights="none", image_size=168, layer="prenorm", flip=False)(canvas)
    assert torch.equal(tokens, again)
    # Rows 0-1 and 10-11 are padding farther than the descriptor's reach (radius + 4 sigma) from the image.
    valid = transform.valid_patches()
    far = np.zeros((12, 12), dtype=bool)
    far[[0, 1, 10, 11]] = True
    assert not valid[far].any()
    flat = torch.full((104,), 104**-0.5)
    torch.testing.assert_close(tokens[0][torch.from_numpy(far)], flat.expand(48, -1))
    assert (tokens[0][torch.from_numpy(valid)] - flat).abs().amax(dim=-1).min() > 0.01


def test_daisy_grid_follows_the_patch_grid():
    grey = np.random.default_rng(1).random((168, 168))
    daisy = create_backbone("daisy", weights="none", image_size=168, layer="prenorm", flip=False)
    tokens = daisy(grey_canvas(grey))[0]
    shifted = daisy(grey_canvas(np.roll(grey, 14, axis=1)))[0]
    # Content moved one patch right moves the interior descriptors one patch right, exactly.
    torch.testing.assert_close(shifted[3:9, 4:9], tokens[3:9, 3:8], rtol=1e-4, atol=1e-5)
