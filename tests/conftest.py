"""Shared test setup: ``tests/gaussians.py`` importable as ``gaussians``, and a one-thread fixture."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and on a busy 2-core machine two threads can be
    100x slower (measured). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
