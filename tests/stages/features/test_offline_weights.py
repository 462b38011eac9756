"""The features stage and ``match-pair`` offline with hub weights: one line with the fix, found before any cluster
starts or any model is built."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli

REPO = Path(__file__).resolve().parents[3]
CATALOG = REPO / "catalog.yaml"  # the shipped catalog: its default backbone, dinov2_vitb14, from the hub
THE_FIX = (
    r"^error: backbones\.dinov2_vitb14: the weights of vit_base_patch14_dinov2\.lvd142m could not be downloaded "
    r"from the Hugging Face hub .*dinov2_vitb14_pretrain\.pth\) and point this backbone's `weights:` in the "
    r"catalog at the local \.pth/\.safetensors file\.$"
)


@pytest.fixture
def stores(tmp_path, monkeypatch) -> dict[str, str]:
    """Store roots in ``tmp_path`` with the demo dataset downloaded and normalised; an empty hub cache."""
    roots = {
        "PIPELINE_DATA_ROOT": str(tmp_path / "data"),
        "PIPELINE_CACHE_ROOT": str(tmp_path / "cache"),
        "PIPELINE_OUTPUTS": str(tmp_path / "outputs"),
        "HF_HOME": str(tmp_path / "hf"),
    }
    for name, value in roots.items():
        monkeypatch.setenv(name, value)
    args = ["--catalog", str(CATALOG), "-q", "run", "--stage", "download", "--stage", "normalize", "--dataset", "demo"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return roots


def features_run(env: dict[str, str], *options: str) -> subprocess.CompletedProcess:
    """``pipeline [options] run --stage features --dataset demo`` in a fresh interpreter (huggingface_hub reads
    HF_HUB_OFFLINE and HF_ENDPOINT at import)."""
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "--catalog", str(CATALOG), *options]
    command += ["run", "--stage", "features", "--dataset", "demo"]
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=environ)


@pytest.mark.slow
def test_unreachable_hub_fails_in_one_line_that_names_the_model_and_the_fix_before_any_cluster(stores):
    # A machine without a network: the hub's address refuses connections and offline mode is not set.
    result = features_run({**stores, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(THE_FIX, errors[0]), result.stderr[-3000:]
    assert "the hub cannot be reached" in errors[0]
    assert "stage features: demo" in result.stderr  # the stage ran, and logged, but
    assert "LocalCluster" not in result.stderr and "distributed" not in result.stderr  # started no cluster,
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr  # without retries or a traceback
    assert not (Path(stores["PIPELINE_CACHE_ROOT"]) / "features").exists()


@pytest.mark.slow
def test_offline_mode_fails_with_that_line_alone(stores):
    result = features_run({**stores, "HF_HUB_OFFLINE": "1"}, "-q")
    assert result.returncode == 1
    assert re.fullmatch(THE_FIX, result.stderr.strip()) and "HF_HUB_OFFLINE is set" in result.stderr


@pytest.mark.slow
def test_match_pair_offline_fails_with_that_line_before_importing_torch(stores, tmp_path):
    """The check runs before torch and timm are imported: the command answers in about a second."""
    command = "\n".join(
        [
            "import sys",
            "from pipeline.cli import main",
            "try:",
            f"    sys.argv = ['pipeline', '--catalog', {str(CATALOG)!r}, 'match-pair', 'a.png', 'b.png']",
            "    main()",
            "except SystemExit as done:",
            "    print('torch' in sys.modules, 'timm' in sys.modules, done.code)",
        ]
    )
    environ = {**os.environ, "PYTHONPATH": str(REPO), **stores, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, cwd=tmp_path, env=environ)
    assert re.fullmatch(THE_FIX, result.stderr.strip()) and "HF_HUB_OFFLINE is set" in result.stderr, result.stderr
    assert result.stdout.split() == ["False", "False", "1"]
