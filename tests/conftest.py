"""Shared test setup: run from the repo root with no install step."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Real data lives beside the checkout (../shared/data); KASA_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("KASA_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
