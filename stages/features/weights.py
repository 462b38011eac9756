"""Whether a backbone's weights can be loaded, found on the driver in seconds, before any cluster starts.

Hub weights must be in the Hugging Face cache or the hub reachable: one probe without retries (the hub
client itself retries for about 50 s when offline), without importing torch or timm for DINOv2. A weights
file must be readable and fit the model (names and shapes, no tensor data read).
"""

from __future__ import annotations

from pathlib import Path

from stages.features.backbone_keys import DAISY, WeightsUnavailableError, hub_source

# What timm's load_state_dict_from_hf fetches by default, in its order of preference.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_PROBE_TIMEOUT_S = 3.0


def weights_unavailable(model: str, reason: str) -> WeightsUnavailableError:
    """The one-line error for hub weights of ``model`` that cannot be had, with how to use a local file."""
    repo, _, url = hub_source(model)
    original = f" (e.g. the original checkpoint {url})" if url else ""
    return WeightsUnavailableError(
        f"the weights of {model} could not be downloaded from the Hugging Face hub ({repo}: {reason}). "
        f"Fetch them on a machine with internet access{original} and point this backbone's `weights:` in the "
        f"catalog at the local .pth/.safetensors file."
    )


def hub_weights_file(model: str) -> Path | None:
    """The cached hub weights of ``model``, or None when the hub answers (a download will fetch them).

    Raises WeightsUnavailableError at once when neither: offline mode (``HF_HUB_OFFLINE``), or one probe
    of the hub, without retries, that cannot connect within ``HUB_PROBE_TIMEOUT_S``.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    repo, filename, _ = hub_source(model)
    candidates = (filename,) if filename else HUB_WEIGHT_FILES
    for candidate in candidates:
        cached = try_to_load_from_cache(repo, candidate)
        if isinstance(cached, str):
            return Path(cached)
    if is_offline_mode():
        raise weights_unavailable(model, "HF_HUB_OFFLINE is set and they are not in the local cache")
    try:
        get_hf_file_metadata(hf_hub_url(repo, candidates[0]), timeout=HUB_PROBE_TIMEOUT_S)
    except HfHubHTTPError:
        pass  # the hub answered (a missing file, an error page): the download reports the details
    except (OSError, HTTPError) as error:  # no connection, no DNS, a timeout
        raise weights_unavailable(model, f"the hub cannot be reached: {error}") from error
    return None


def check_weights(model: str, weights: str) -> None:
    """Raise BackboneError now, on the driver, when ``model``'s ``weights`` could not be loaded.

    Hub weights: cached, or the hub reachable (about a second offline). A weights file: readable and fitting
    the model (``backbones.check_weights_file``, which imports torch and timm). Random weights and DAISY
    need nothing.
    """
    if model == DAISY or weights.startswith("random"):
        return
    if weights == "hub":
        hub_weights_file(model)
        return
    from stages.features.backbones import check_weights_file

    check_weights_file(model, Path(weights).expanduser())
