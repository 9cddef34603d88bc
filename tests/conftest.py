"""Shared test helpers: the repo root on sys.path and the path to ../shared/fixtures."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(os.path.dirname(ROOT), "shared", "fixtures")


@pytest.fixture
def fixtures_dir():
    if not os.path.isdir(FIXTURES):
        pytest.skip(f"{FIXTURES} not found (CI places ../shared beside the clone)")
    return FIXTURES


@pytest.fixture
def one_thread():
    """Tiny convolutions on one thread: on a busy 2-core machine a second OpenMP thread makes them 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
