"""Shared test fixtures: where the real benchmark samples live, and a small catalog in a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach the network: make huggingface_hub fail at once instead of retrying (read at its import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

pytest_plugins = ["tests.http_server"]  # the local HTTP server fixtures: server, closed_port_url

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """``../shared/fixtures``: real TSS and PF-WILLOW samples (read-only; never copied into the repo)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.fail(f"the shared fixtures are missing at {SHARED_FIXTURES}")
    return SHARED_FIXTURES
