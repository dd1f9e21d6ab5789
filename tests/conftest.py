import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the four scripts live at the top level


def pytest_collection_modifyitems(config, items):
    # `cuda` tests run only where a GPU is visible (tools/device_check.sh runs them with `pytest -m cuda`)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tools/device_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
