"""Shared fixtures: the real data directory ($REARANK_DATA, as CI sets it) and a scratch cache."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the modules are flat files at the top level


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = os.environ.get("REARANK_DATA")
    if not root or not Path(root, "trec_dl").is_dir():
        pytest.skip("set REARANK_DATA to the shared data directory (CI does: ../shared/data)")
    return Path(root)
