"""Settings of every test session, doctests of the package included (``--doctest-modules``)."""

import importlib.util

import pytest
import torch
from _pytest.doctest import DoctestItem

# The lightning.pytorch flavour of the package's LightningModule needs the optional unified
# package; its doctest is collected only where that package is installed.
collect_ignore = (
    [] if importlib.util.find_spec("lightning") else ["resode_lightning/lit/lightning_pytorch.py"]
)

# One thread per process: two pytest-xdist workers share two cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _doctest_in_tmp_path(request: pytest.FixtureRequest) -> None:
    """Docstring examples run seeded, in a fresh temporary directory: files they write (data
    folders, logs) land there, never in the repository."""
    if isinstance(request.node, DoctestItem):
        torch.manual_seed(0)
        request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
