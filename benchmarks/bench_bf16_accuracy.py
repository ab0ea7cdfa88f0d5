"""bfloat16 on CPU keeps the predictions: top-1 accuracy of the digits model in float32, as a bfloat16 model
(`from_pretrained(..., dtype=torch.bfloat16)`) and under `torch.autocast("cpu", dtype=torch.bfloat16)`, and the
top-1 classes of the official fixture models (tests/fixtures/models) in the same three modes.

    python train_classification.py                     # trains the digits model into outputs/internimage-digits
    python benchmarks/bench_bf16_accuracy.py [FOLDER]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CLIPImageProcessor

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from official_format import FIXTURE_MODELS, fixture_classifier  # noqa: E402

import train_classification  # noqa: E402
from modeling_internimage import InternImageForImageClassification  # noqa: E402


def modes(folder_or_model: str | torch.nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Logits functions: float32, a bfloat16 model, and the float32 model under bfloat16 autocast."""
    if isinstance(folder_or_model, str):
        float32 = InternImageForImageClassification.from_pretrained(folder_or_model).eval()
        bfloat16 = InternImageForImageClassification.from_pretrained(folder_or_model, dtype=torch.bfloat16).eval()
    else:
        float32 = folder_or_model.eval()
        bfloat16 = InternImageForImageClassification(float32.config).to(torch.bfloat16).eval()
        bfloat16.load_state_dict(float32.state_dict())

    def autocast(pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return float32(pixel_values).logits

    return {
        "float32": lambda pixel_values: float32(pixel_values).logits,
        "bfloat16 model": lambda pixel_values: bfloat16(pixel_values.bfloat16()).logits,
        "bfloat16 autocast": autocast,
    }


@torch.no_grad()
def digits_accuracy(folder: str, batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy (%) on the digits validation split the training script holds out."""
    _, data_args, _, training_args = train_classification.parse_arguments([])
    splits, _ = train_classification.load_data(data_args, training_args.seed)
    validation = splits["validation"]
    processor = CLIPImageProcessor.from_pretrained(folder)
    images = [train_classification.load_rgb(image) for image in validation["image"]]
    labels = torch.tensor(validation["label"])
    accuracy = {}
    for name, logits_of in modes(folder).items():
        correct = 0
        for start in range(0, len(images), batch_size):
            pixel_values = processor(images=images[start : start + batch_size], return_tensors="pt").pixel_values
            correct += (logits_of(pixel_values).argmax(-1) == labels[start : start + batch_size]).sum().item()
        accuracy[name] = 100 * correct / len(images)
    return accuracy


@torch.no_grad()
def fixture_top1(name: str) -> dict[str, list[int]]:
    """Top-1 classes of an official fixture model on its fixture input, in each mode and officially."""
    model, pixel_values, expected = fixture_classifier(name)
    top1 = {"official": expected["logits"].argmax(-1).tolist()}
    top1.update({mode: logits_of(pixel_values).argmax(-1).tolist() for mode, logits_of in modes(model).items()})
    return top1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="outputs/internimage-digits", help="the trained digits model")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    accuracy = digits_accuracy(args.folder)
    print(f"\ndigits validation top-1 ({args.folder}):")
    for mode, value in accuracy.items():
        print(f"  {mode:18s} {value:6.2f} %  ({value - accuracy['float32']:+.2f} points)")
    print("\nfixture models, top-1 class per image:")
    for name in sorted(path.name for path in FIXTURE_MODELS.iterdir()):
        top1 = fixture_top1(name)
        unchanged = all(classes == top1["official"] for classes in top1.values())
        print(f"  {name}: {top1} -> {'unchanged' if unchanged else 'CHANGED'}")


if __name__ == "__main__":
    main()
