"""Shared test settings: where the real data lies, and Ray's environment for every test process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(os.environ.get("ADREC_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))

# Set before any test starts Ray, so every Ray process agrees (see shared/notes).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("ADREC_PSEUDONYM_KEY", "test-key")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    if not (ML100K / "u.data").is_file():
        pytest.skip(f"MovieLens-100k not found at {ML100K} (set ADREC_ML100K)")
    return ML100K
