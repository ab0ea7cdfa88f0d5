"""Shared test helpers: the repository on `sys.path`, the fixtures folder, offline subprocesses and models whose
DCNv3 sampling is really deformable; tests marked `@pytest.mark.gpu` (`pytest -m gpu` selects exactly them) skip
without a CUDA device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def offline_env(hf_home: Path) -> dict[str, str]:
    """The current environment with the Hub offline and a private `HF_HOME` (its remote-code module cache)."""
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def run_python(args: list[str], hf_home: Path, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python ARGS...` offline with a private `HF_HOME`; returns the completed process (output as text)."""
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=offline_env(hf_home), capture_output=True, text=True,
        timeout=timeout,
    )


def perturb_sampling(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every DCNv3 module's offset and mask projections moved away from the official initialisation
    (zero offsets and uniform masks, where every point samples the integer grid): offsets of a pixel or two
    (fractional, corners outside small maps) and masks that differ between points."""
    from modeling_internimage import InternImageDCNv3

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, InternImageDCNv3):
                module.offset.weight.normal_(0, 0.5)
                module.offset.bias.normal_(0, 1.0)
                module.mask.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def session_hf_home(tmp_path_factory) -> Path:
    """One private `HF_HOME` shared by the subprocesses of a test session."""
    return tmp_path_factory.mktemp("hf_home")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    needs_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(needs_cuda)
