"""tests/gpu/: run only where CUDA is present (a GPU machine); everywhere else, CI included, skipped.

Every test in this folder gets the `gpu` marker (`pytest -m "not gpu"` leaves them out), and is
skipped without CUDA. The `cuda` fixture is the configured GPU (CUDA_DEVICE_ID), made current.
"""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    from config import Settings

    device = torch.device(Settings.from_env(env={}).device)
    torch.cuda.set_device(device)
    return device
