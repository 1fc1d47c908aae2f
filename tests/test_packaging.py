"""Packaging: the wheel carries what the demo needs, and the version lives in one place."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import resode_lightning
from resode_lightning.apps import demo

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_reads_its_configs_from_the_package():
    assert demo.CONFIGS.parent == Path(resode_lightning.__file__).parent
    assert {"digits_iid.yaml", "digits_ode_resnet.yaml"} <= {p.name for p in demo.CONFIGS.iterdir()}


def test_the_wheel_carries_the_configs_and_the_version(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation"]
        + ["-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")
    assert f"-{resode_lightning.__version__}-" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    for config in demo.CONFIGS.glob("*.yaml"):
        assert f"resode_lightning/configs/{config.name}" in names
