"""DCNv3 benchmark: the core op on InternImage stage shapes for every available backend, and model throughput.

Op rows: forward and forward+backward time (median of `--reps` after warm-up) per backend, stage, dtype, and
the achieved bandwidth of the compulsory traffic (each tensor read or written once; the input-gradient buffer is
float32 and read-modified-written) as a fraction of the measured peak (a large device-to-device copy).
Model rows: InternImage-T (224) and -L (384) in float16, images/s at batch 128 and batch-1 latency.

    python benchmarks/bench_dcnv3.py                              # on a GPU: all backends, T/B/L/H, 3 dtypes
    python benchmarks/bench_dcnv3.py --variants t --dtypes float16 --skip-model
    TRITON_INTERPRET=1 python benchmarks/bench_dcnv3.py --device cpu --small   # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configuration_internimage import InternImageConfig  # noqa: E402
from dcnv3_ops import BACKENDS, dcnv3_core, dcnv3_output_size, resolve_dcn_backend  # noqa: E402
from modeling_internimage import InternImageForImageClassification  # noqa: E402

VARIANTS = {
    "t": "internimage_t_1k_224",
    "b": "internimage_b_1k_224",
    "l": "internimage_l_22kto1k_384",
    "h": "internimage_h_22kto1k_384",
}
MODEL_VARIANTS = ("t", "l")


def available_backends(device: torch.device) -> list[str]:
    """Every concrete backend that can run on `device` (pytorch, triton, cuda when importable)."""
    names = []
    for name in BACKENDS:
        if name == "auto":
            continue
        try:
            resolve_dcn_backend(name, device)
        except RuntimeError as error:
            print(f"# backend {name}: unavailable ({error})")
            continue
        names.append(name)
    return names


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of `function` over `reps` calls after `warmup` calls (synchronised on CUDA)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes/s of a large device copy (read + write)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, reps=10, warmup=3)
    return 2 * source.numel() / seconds


def stage_shapes(variant: str, small: bool) -> list[tuple[int, int, int]]:
    """(size, group, group_channels) of the DCNv3 core input in each stage."""
    config = InternImageConfig.from_variant(variant)
    image_size = 32 if small else config.image_size
    return [
        (image_size // 4 // 2**stage, groups, config.channels * 2**stage // groups)
        for stage, groups in enumerate(config.groups)
    ]


def op_tensors(batch: int, size: int, group: int, group_channels: int, dtype: torch.dtype, device: torch.device):
    """Random (input, offset, mask) of a 3x3, stride 1, pad 1 DCNv3 core, with offsets of a few pixels."""
    points = 9
    size_out = dcnv3_output_size(size, 3, 1, 1, 1)
    input = torch.randn(batch, size, size, group * group_channels, device=device, dtype=dtype)
    offset = 2 * torch.randn(batch, size_out, size_out, group * points * 2, device=device, dtype=dtype)
    mask = torch.randn(batch, size_out, size_out, group, points, device=device).softmax(-1).flatten(-2).to(dtype)
    return input, offset, mask


def compulsory_bytes(tensors: tuple[torch.Tensor, ...], backward: bool) -> int:
    """Bytes that must move at least once. Forward: read input, offset and mask, write the output (input-sized).
    Backward adds: read grad_output, input, offset and mask; zero, read-modify-write and cast a float32
    input-gradient buffer (16 bytes per element) and write the input-dtype gradient; write grad_offset, grad_mask."""
    input, offset, mask = tensors
    forward = 2 * input.nbytes + offset.nbytes + mask.nbytes
    if not backward:
        return forward
    reads = 2 * input.nbytes + offset.nbytes + mask.nbytes
    input_gradient = 16 * input.numel() + input.nbytes
    return forward + reads + input_gradient + offset.nbytes + mask.nbytes


def _forward(tensors: tuple[torch.Tensor, ...], arguments: tuple, backend: str) -> torch.Tensor:
    with torch.no_grad():
        return dcnv3_core(*tensors, *arguments, backend=backend)


def _forward_backward(leaves: list[torch.Tensor], arguments: tuple, backend: str) -> tuple[torch.Tensor, ...]:
    output = dcnv3_core(*leaves, *arguments, backend=backend)
    return torch.autograd.grad(output, leaves, torch.ones_like(output))


def bench_ops(args: argparse.Namespace, device: torch.device, backends: list[str], peak: float) -> None:
    print("\n| variant | stage | shape (N,H,W,G,Cg) | dtype | backend | fwd ms | fwd GB/s | fwd % peak "
          "| fwd+bwd ms | fwd+bwd GB/s | fwd+bwd % peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants:
        for stage, (size, group, group_channels) in enumerate(stage_shapes(VARIANTS[variant], args.small)):
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                tensors = op_tensors(args.batch, size, group, group_channels, dtype, device)
                arguments = (3, 3, 1, 1, 1, 1, 1, 1, group, group_channels, 1.0, 0)
                leaves = [t.clone().requires_grad_() for t in tensors]
                for backend in backends:
                    forward = functools.partial(_forward, tensors, arguments, backend)
                    forward_backward = functools.partial(_forward_backward, leaves, arguments, backend)
                    forward_s = median_seconds(forward, device, args.reps, args.warmup)
                    both_s = median_seconds(forward_backward, device, args.reps, args.warmup)
                    forward_rate = compulsory_bytes(tensors, backward=False) / forward_s
                    both_rate = compulsory_bytes(tensors, backward=True) / both_s
                    print(
                        f"| {variant.upper()} | {stage} | {args.batch},{size},{size},{group},{group_channels} "
                        f"| {dtype_name} | {backend} | {forward_s * 1e3:.3f} | {forward_rate / 1e9:.0f} "
                        f"| {100 * forward_rate / peak:.0f}% | {both_s * 1e3:.3f} | {both_rate / 1e9:.0f} "
                        f"| {100 * both_rate / peak:.0f}% |",
                        flush=True,
                    )


def bench_models(args: argparse.Namespace, device: torch.device, backends: list[str]) -> None:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    batch = 2 if args.small else args.model_batch
    print(f"\n| model | backend | dtype | img/s (batch {batch}) | batch-1 latency ms |")
    print("|---|---|---|---|---|")
    for variant in MODEL_VARIANTS:
        for backend in backends:
            if args.small:
                config = InternImageConfig(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], dcn_backend=backend)
                image_size = 32
            else:
                config = InternImageConfig.from_variant(VARIANTS[variant], dcn_backend=backend)
                image_size = config.image_size
            model = InternImageForImageClassification(config).to(device=device, dtype=dtype).eval()
            batch_pixels = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
            single_pixels = batch_pixels[:1].clone()
            with torch.no_grad():
                batch_s = median_seconds(functools.partial(model, batch_pixels), device, args.reps, args.warmup)
                single_s = median_seconds(functools.partial(model, single_pixels), device, args.reps, args.warmup)
            print(f"| {variant.upper()} {image_size} | {backend} | {str(dtype).split('.')[-1]} "
                  f"| {batch / batch_s:.1f} | {single_s * 1e3:.2f} |", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --small, as a smoke test)")
    parser.add_argument("--small", action="store_true", help="tiny shapes and models (CPU smoke test)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=64, help="op batch size")
    parser.add_argument("--model-batch", type=int, default=128, help="model throughput batch size")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: nothing to benchmark. For a CPU smoke test run "
              "`TRITON_INTERPRET=1 python benchmarks/bench_dcnv3.py --device cpu --small`.")
        return
    if device.type == "cpu" and not args.small:
        parser.error("--device cpu needs --small (the full shapes take hours on CPU, and Triton only interprets)")
    if args.small:
        args.batch, args.reps, args.warmup = min(args.batch, 2), min(args.reps, 2), min(args.warmup, 1)

    backends = available_backends(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_copy_bandwidth(device, 64 if args.small else 2048)
    print(f"# device {name}, torch {torch.__version__}, backends {backends}, peak copy {peak / 1e9:.0f} GB/s")
    bench_ops(args, device, backends, peak)
    if not args.skip_model:
        bench_models(args, device, backends)


if __name__ == "__main__":
    main()
