"""ONNX export (`export_onnx.py`): the CLI's graph against PyTorch and the official outputs, with a dynamic batch,
and README's export command."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from official_format import fixture_classifier  # noqa: E402

FOLDER_PLACEHOLDER = "path/to/converted/folder"


def test_onnx_export_cli_matches_pytorch(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    from export_onnx import main

    model, pixel_values, expected = fixture_classifier("tiny_l")
    model.save_pretrained(tmp_path / "model")
    output = tmp_path / "model.onnx"
    assert main([str(tmp_path / "model"), str(output), "--height", "64", "--width", "96"]) == 0
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
    with torch.no_grad():
        eager = model(pixel_values).logits
    torch.testing.assert_close(torch.from_numpy(logits), eager, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(logits), expected["logits"], rtol=1e-4, atol=1e-4)
    for batch in (1, 3):  # the batch size is dynamic
        images = pixel_values[:1].repeat(batch, 1, 1, 1) + 0.1 * torch.randn(batch, *pixel_values.shape[1:])
        (logits,) = session.run(["logits"], {"pixel_values": images.numpy()})
        with torch.no_grad():
            eager = model(images).logits
        torch.testing.assert_close(torch.from_numpy(logits), eager, rtol=0, atol=1e-4)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), str(tmp_path / "x.onnx")])
    assert "has no config.json" in capsys.readouterr().err


def test_readme_onnx_command_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from export_onnx import main

    section = (ROOT / "docs" / "usage.md").read_text().split("## ONNX export\n", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1)
    model, _, _ = fixture_classifier("tiny_t")
    model.save_pretrained(tmp_path / "model")
    command = command.replace(FOLDER_PLACEHOLDER, str(tmp_path / "model")).replace("224", "64")
    arguments = shlex.split(command)
    assert arguments[:2] == ["python", "export_onnx.py"] and "--check" in arguments
    monkeypatch.chdir(tmp_path)
    assert main(arguments[2:]) == 0
    assert (tmp_path / "internimage.onnx").stat().st_size > 0
