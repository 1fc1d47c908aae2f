import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Two cores run two pytest-xdist workers: more threads per worker oversubscribe the CPU, which
# slows small convolutions by an order of magnitude.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
