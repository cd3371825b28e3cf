"""Shared fixtures. Real MNIST comes from $MNIST_DIR (a folder holding MNIST/raw/, as .ci/run prepares it)."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def mnist_dir():
    path = os.environ.get("MNIST_DIR")
    if not path or not (Path(path) / "MNIST" / "raw").is_dir():
        if os.environ.get("CI"):
            pytest.fail("MNIST_DIR must point at a folder with MNIST/raw/ in CI (.ci/run prepares it)")
        pytest.skip("set MNIST_DIR to a folder holding MNIST/raw/ to run the tests on real data")
    return Path(path).resolve()
