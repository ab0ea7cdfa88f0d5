"""Training throughput of InternImage (forward + backward + AdamW step), in images per second.

CPU: float32 with the PyTorch DCNv3 backend. GPU: every available backend (pytorch, triton, cuda), float32 and
bfloat16 autocast. Backends are measured interleaved (round-robin repeats, median reported) so that load from other
processes affects them alike.

    python benchmarks/bench_train.py                         # InternImage-T at 224, CPU batch 4, GPU batch 64
    python benchmarks/bench_train.py --variant internimage_b_1k_224 --gpu-batch-size 32 --json results.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dcnv3 import available_backends, peak_memory_mib, use_backend  # noqa: E402
from bench_tables import error_text  # noqa: E402

from configuration_internimage import InternImageConfig  # noqa: E402
from modeling_internimage import InternImageForImageClassification  # noqa: E402


def make_step(model: torch.nn.Module, batch_size: int, image_size: int, device: torch.device, dtype: torch.dtype):
    """One training step closure on fixed random data."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, model.config.num_labels, (batch_size,), device=device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(pixel_values=pixel_values).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure(step, device: torch.device, iterations: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iterations


def bench_train_step(
    model: torch.nn.Module, name: str, backend: str, batch_size: int, device: torch.device, dtype: torch.dtype,
    warmup: int = 2, iterations: int = 5,
) -> dict:
    """One training step of `model` on `backend`: images/s, s/step, the peak memory of a step (weights, gradients,
    AdamW state and activations) and the loss after the timed steps, which must be finite."""
    use_backend(model.train(), backend)
    row = {"kind": "train_step", "model": name, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
           "batch": batch_size}
    try:
        step = make_step(model, batch_size, model.config.image_size, device, dtype)
        for _ in range(warmup):
            step()
        seconds = measure(step, device, iterations)
        row.update(seconds_per_step=seconds, images_per_s=batch_size / seconds,
                   peak_mib=peak_memory_mib(step, device, absolute=True), loss=step().item())
        row["ok"] = math.isfinite(row["loss"])
    except Exception as error:  # one backend's failure is a result, not the end of the benchmark
        row.update(error=error_text(error), ok=False)
    return row


def benchmark(
    variant: str, device: torch.device, batch_size: int, dtypes: list[torch.dtype], warmup: int, iterations: int,
    repeats: int,
) -> list[dict]:
    config = InternImageConfig.from_variant(variant)
    torch.manual_seed(0)
    model = InternImageForImageClassification(config).to(device).train()
    cases = [(backend, dtype) for backend in available_backends(device) for dtype in dtypes]
    steps = {case: make_step(model, batch_size, config.image_size, device, case[1]) for case in cases}
    timings = {case: [] for case in cases}
    for case in cases:
        use_backend(model, case[0])
        measure(steps[case], device, warmup)
    for _ in range(repeats):
        for case in cases:
            use_backend(model, case[0])
            timings[case].append(measure(steps[case], device, iterations))
    results = []
    for (backend, dtype), seconds in timings.items():
        median = statistics.median(seconds)
        results.append({
            "variant": variant, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "backend": backend, "dtype": str(dtype).removeprefix("torch."),
            "batch_size": batch_size, "image_size": config.image_size, "seconds_per_step": median,
            "images_per_second": batch_size / median,
        })
        print(
            f"  {variant} {results[-1]['device']} {backend:8s} {results[-1]['dtype']:9s} batch {batch_size:3d}: "
            f"{batch_size / median:8.1f} img/s ({median * 1000:.0f} ms/step)"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="internimage_t_1k_224")
    parser.add_argument("--cpu-batch-size", type=int, default=4)
    parser.add_argument("--gpu-batch-size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3, help="steps per timing (GPU: x10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    results = []
    if not args.skip_cpu:
        print(f"CPU ({torch.get_num_threads()} threads):")
        results += benchmark(
            args.variant, torch.device("cpu"), args.cpu_batch_size, [torch.float32], 1, args.iterations, args.repeats
        )
    if torch.cuda.is_available():
        print("GPU:")
        results += benchmark(
            args.variant, torch.device("cuda"), args.gpu_batch_size, [torch.float32, torch.bfloat16], 5,
            args.iterations * 10, args.repeats,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
