"""Helpers of the training-script tests: running `train_classification.py` offline, its parsed arguments, and image
folders on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import offline_env as hub_offline_env
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_classification.py")
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def offline_env(tmp_path: Path) -> dict[str, str]:
    """conftest's offline environment (`HF_HOME` under `tmp_path`) for the training script, on the CPU."""
    return {
        **hub_offline_env(tmp_path / "hf_home"), "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",  # the CPU recipe everywhere: bit-exact resumes, GPU atomics are not reproducible
    }


def run_command(tmp_path: Path, command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**offline_env(tmp_path), **(env or {})}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def run_script(tmp_path: Path, *args: str, launcher: list[str] | None = None) -> str:
    """Run the training script (optionally under `launcher`, e.g. torchrun); it must succeed. Returns its output."""
    result = run_command(tmp_path, (launcher or [sys.executable]) + [SCRIPT, *args])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def parsed_values(argv: list[str]) -> dict:
    """Every argument `train_classification.parse_arguments(argv)` returns, by name, enums as their string values."""
    script = pytest.importorskip("train_classification")  # it needs datasets and evaluate
    values = {}
    for arguments in script.parse_arguments(argv):
        for name, value in vars(arguments).items():
            values[name] = getattr(value, "value", value)
    return values


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


WNIDS = ["n01440764", "n01443537", "n01484850"]
LIST_LABELS = {"n01440764": 2, "n01443537": 0, "n01484850": 1}  # deliberately not the sorted-folder order


def photo_crops(count: int, size: int = 48) -> list[Image.Image]:
    """`count` different crops of scikit-learn's sample photos."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        top, left = (37 * index) % (photo.shape[0] - size), (53 * index) % (photo.shape[1] - size)
        crops.append(Image.fromarray(photo[top : top + size, left : left + size]))
    return crops


def make_imagenet_folder(root: Path) -> dict[str, int]:
    """ROOT/{train,val}/<wnid>/*.JPEG with list files; train also holds a corrupt file, grayscale, CMYK, RGBA and
    palette images, and its list names a missing file (on its last line). Returns the val file -> label map."""
    crops = iter(photo_crops(40))
    lines = {"train": [], "val": []}
    for split, per_class in (("train", 6), ("val", 2)):
        for wnid in WNIDS:
            (root / split / wnid).mkdir(parents=True)
            for index in range(per_class):
                name = f"{wnid}/{wnid}_{split}_{index}.JPEG"
                next(crops).save(root / split / name, format="JPEG")
                lines[split].append(f"{name} {LIST_LABELS[wnid]}")
    odd = {
        "gray.JPEG": next(crops).convert("L"), "cmyk.JPEG": next(crops).convert("CMYK"),
        "rgba.png": next(crops).convert("RGBA"), "palette.png": next(crops).convert("P"),
    }
    for name, image in odd.items():
        image.save(root / "train" / WNIDS[0] / name)
        lines["train"].append(f"{WNIDS[0]}/{name} {LIST_LABELS[WNIDS[0]]}")
    (root / "train" / WNIDS[1] / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    lines["train"].append(f"{WNIDS[1]}/corrupt.JPEG {LIST_LABELS[WNIDS[1]]}")
    lines["train"].append(f"{WNIDS[2]}/missing.JPEG {LIST_LABELS[WNIDS[2]]}")
    for split in ("train", "val"):
        (root / f"{split}_list.txt").write_text("\n".join(lines[split]) + "\n")
    return {line.split()[0]: int(line.split()[1]) for line in lines["val"]}
