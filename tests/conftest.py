import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("COCA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; run with COCA_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny():
    import coca
    torch.manual_seed(0)
    return coca.create_model("coca-tiny").eval()
