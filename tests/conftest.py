"""Shared test helpers: the repo root on sys.path and the path to ../shared/fixtures."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(os.path.dirname(ROOT), "shared", "fixtures")


@pytest.fixture
def fixtures_dir():
    if not os.path.isdir(FIXTURES):
        pytest.skip(f"{FIXTURES} not found (CI places ../shared beside the clone)")
    return FIXTURES
