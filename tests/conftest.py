"""Shared fixtures: tiny data sets written in the real formats and tiny run configurations.

Everything here builds real components (real IDX files, real configs); nothing is mocked. Plain helpers
(CLI runners, config builders) live in helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import build_tiny_cfg
from modelworks.data.synthetic import write_fashion_mnist


@pytest.fixture(autouse=True)
def _restore_torch_global_state():
    """fit() seeds torch and may switch on deterministic algorithms; keep that from leaking between tests."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.get_rng_state()
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_rng_state(rng)
    torch.backends.cudnn.benchmark = benchmark


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    """A folder holding the four gzipped Fashion-MNIST IDX files (512 train, 256 test images)."""
    return write_fashion_mnist(tmp_path / "fashion-mnist-data", n_train=512, n_test=256)


@pytest.fixture
def tiny_cfg():
    """`tiny_cfg(tmp_path, **overrides)` -> RunConfig (see build_tiny_cfg)."""
    return build_tiny_cfg
