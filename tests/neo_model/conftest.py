"""Shared settings for the neo_model tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Run on one intra-op thread: these tensors are tiny, and on a busy 2-core machine thread
    synchronisation made the suite 3-4x slower than the arithmetic itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
