from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _two_threads():
    """Every test runs with the CI box's thread count and restores the caller's."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def needs_kernel():
    """Skip where the machine cannot build the kernel at all; fail where the build itself breaks."""
    from prunekit_cpu1xn.testing import require_kernel

    return require_kernel()
