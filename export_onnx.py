"""Export an InternImage classifier folder to ONNX and check it with onnxruntime.

    python export_onnx.py path/to/folder model.onnx --height 224 --width 224 --check

The export traces the PyTorch DCNv3 path with `torch.onnx.export(..., dynamo=True)` (needs `onnx` and
`onnxscript`; `--check` also needs `onnxruntime`). The graph's input is (batch, 3, height, width) with a dynamic
batch size and the fixed height and width given on the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers.utils import logging

try:
    from .modeling_internimage import InternImageForImageClassification
except ImportError:
    from modeling_internimage import InternImageForImageClassification

logger = logging.get_logger(__name__)


def export_onnx(model_folder: str | Path, output: str | Path, height: int, width: int) -> Path:
    """Write the ONNX graph of the folder's classifier (input `pixel_values` (batch, C, height, width) with a dynamic
    batch, output `logits`) to `output`."""
    model = InternImageForImageClassification.from_pretrained(model_folder, dcn_backend="pytorch").eval()
    # Traced with a batch of 2: torch.export specialises dimensions of size 1.
    pixel_values = torch.randn(2, model.config.num_channels, height, width)
    output = Path(output)
    temporary = output.with_name(output.name + ".tmp")
    program = torch.onnx.export(
        model, (pixel_values,), None, dynamo=True, input_names=["pixel_values"], output_names=["logits"],
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
    )
    program.save(str(temporary))
    os.replace(temporary, output)
    return output


def check_onnx(model_folder: str | Path, onnx_path: str | Path, seed: int = 0) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's logits on a random batch of 3 images."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    _, channels, height, width = session.get_inputs()[0].shape
    pixel_values = torch.randn(3, channels, height, width, generator=torch.Generator().manual_seed(seed))
    model = InternImageForImageClassification.from_pretrained(model_folder, dcn_backend="pytorch").eval()
    with torch.no_grad():
        expected = model(pixel_values).logits
    (logits,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
    return (torch.from_numpy(logits) - expected).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_folder", help="a converted or saved InternImage classifier folder")
    parser.add_argument("output", help="path of the .onnx file to write")
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch (max abs diff)")
    args = parser.parse_args(argv)
    if not (Path(args.model_folder) / "config.json").is_file():
        parser.error(f"{args.model_folder} has no config.json: pass a folder from save_pretrained or the converter")
    if min(args.height, args.width) < 1:
        parser.error("--height and --width must be positive")
    path = export_onnx(args.model_folder, args.output, args.height, args.width)
    print(f"wrote {path}")
    if args.check:
        difference = check_onnx(args.model_folder, path)
        print(f"max abs difference onnxruntime vs PyTorch: {difference:.3g}")
        if difference > 1e-4:
            print("error: the ONNX graph disagrees with PyTorch by more than 1e-4", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
