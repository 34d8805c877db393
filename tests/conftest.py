"""Test-wide set-up: the Triton interpreter on CPU-only machines, and the `gpu` marker."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton: the interpreter is chosen at import time.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The tests run many small ops; on a 2-core machine two intra-op threads made them up to 10x slower.
    torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cuda"] if HAS_CUDA else ["cpu"])
def device(request):
    return torch.device(request.param)
