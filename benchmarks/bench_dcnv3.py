"""DCNv3 benchmark: the core op on InternImage stage shapes for every available backend, and model inference speed.

Op rows, per stage shape (named like "56×56, C=64, G=4"), dtype and backend: forward and forward+backward time
(median over repetitions after warm-up, CUDA events; inputs rotate over several sets when one set would stay in
L2), the achieved bandwidth of the compulsory traffic (each tensor read or written once; the input-gradient buffer
is float32 and read-modified-written) as a fraction of a measured device-to-device copy, the peak memory above the
inputs, and the forward's relative error against the PyTorch backend in float32 on the same inputs.
Model rows: InternImage-T (224) and -L (384), images/s at batch 128 and batch-1 latency, eager and replayed as a
CUDA graph. `benchmarks/gpu_check.py` drives these functions (and more) as one GPU check.

    python benchmarks/bench_dcnv3.py                              # on a GPU: all backends, T/B/L/H, 3 dtypes
    python benchmarks/bench_dcnv3.py --variants t --dtypes float16 --skip-model
    TRITON_INTERPRET=1 python benchmarks/bench_dcnv3.py --device cpu --small   # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tables import environment_line, error_text, inference_table, op_table  # noqa: E402

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
DTYPES = ("float32", "float16", "bfloat16")
# Largest accepted |output - reference| / max(|reference|, 1) of one op call against the float32 PyTorch backend.
OP_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# The same for model logits against the float32 model on the PyTorch backend.
MODEL_TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}
MIB = 2**20


@dataclass(frozen=True)
class Timing:
    """Warm-up calls, then as many timed calls as fit in `budget_s` (by a first timed call), within the bounds."""

    warmup: int = 2
    min_reps: int = 3
    max_reps: int = 50
    budget_s: float = 0.1


SMOKE_TIMING = Timing(warmup=0, min_reps=1, max_reps=1, budget_s=0.0)


@dataclass(frozen=True)
class StageShape:
    """The DCNv3 core input of one stage: `size`×`size` pixels, `group` groups of `group_channels` channels."""

    variant: str
    stage: int
    size: int
    group: int
    group_channels: int

    @property
    def name(self) -> str:
        return f"{self.size}×{self.size}, C={self.group * self.group_channels}, G={self.group}"


def backend_availability(device: torch.device) -> dict[str, str | None]:
    """Each concrete backend (pytorch, triton, cuda) with `None` if it runs on `device`, else the reason it cannot."""
    reasons = {}
    for name in BACKENDS:
        if name == "auto":
            continue
        try:
            resolve_dcn_backend(name, device)
        except RuntimeError as error:
            reasons[name] = str(error).splitlines()[0]
        else:
            reasons[name] = None
    return reasons


def available_backends(device: torch.device) -> list[str]:
    """The backends that run on `device`."""
    return [name for name, reason in backend_availability(device).items() if reason is None]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function: Callable[[], object], device: torch.device, timing: Timing = Timing()) -> float:
    """Median time of `function` (CUDA events on GPU, wall clock on CPU) after `timing.warmup` calls."""
    for _ in range(timing.warmup):
        function()
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    first = time.perf_counter() - start
    reps = int(min(max(timing.budget_s / max(first, 1e-6), timing.min_reps), timing.max_reps))
    if device.type != "cuda":
        times = [first]
        for _ in range(reps - 1):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start_event, end_event in events:
        start_event.record()
        function()
        end_event.record()
    torch.cuda.synchronize(device)
    return statistics.median(start_event.elapsed_time(end_event) / 1e3 for start_event, end_event in events)


def peak_memory_mib(function: Callable[[], object], device: torch.device, absolute: bool = False) -> float | None:
    """MiB allocated at the peak of one call, above what was allocated before it unless `absolute`; `None` off
    CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = 0 if absolute else torch.cuda.memory_allocated(device)
    function()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MIB


def peak_copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes/s of a large device copy (bytes read + bytes written)."""
    source = torch.randint(0, 255, (megabytes * MIB,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, Timing(warmup=3, min_reps=10, max_reps=10))
    return 2 * source.numel() / seconds


def _nvidia_smi(query: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    completed = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
    )
    return completed.stdout.strip().splitlines()[0] if completed.returncode == 0 and completed.stdout.strip() else None


def environment(device: torch.device, copy_megabytes: int) -> dict:
    """Device, memory, driver, versions and the measured copy bandwidth (the roofline of the bandwidth figures)."""
    import transformers

    from dcnv3_triton import triton

    info = {
        "device": "cpu", "memory_gib": None, "driver": None, "cuda": torch.version.cuda, "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None), "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            device=properties.name, memory_gib=properties.total_memory / 2**30, driver=_nvidia_smi("driver_version"),
            capability=f"{properties.major}.{properties.minor}",
            l2_mib=getattr(properties, "L2_cache_size", 0) / MIB or None,
        )
    info["copy_gbps"] = peak_copy_bandwidth(device, copy_megabytes) / 1e9
    return info


def stage_shapes(variant: str, small: bool) -> list[StageShape]:
    """The DCNv3 core input of each stage of `variant` ("t", "b", "l" or "h"). `small`: 2×2 pixels and one group of
    the stage's group width (the Triton interpreter takes about 0.1 s per program, one per row and group)."""
    config = InternImageConfig.from_variant(VARIANTS[variant])
    shapes = []
    for stage, groups in enumerate(config.groups):
        group_channels = config.channels * 2**stage // groups
        if small:
            shapes.append(StageShape(variant, stage, 2, 1, group_channels))
        else:
            shapes.append(StageShape(variant, stage, config.image_size // 4 // 2**stage, groups, group_channels))
    return shapes


def op_arguments(shape: StageShape) -> tuple:
    """The hyper-parameters of InternImage's DCNv3 core: 3x3, stride 1, pad 1, dilation 1, offset scale 1."""
    return (3, 3, 1, 1, 1, 1, 1, 1, shape.group, shape.group_channels, 1.0, 0)


def op_tensors(batch: int, shape: StageShape, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random (input, offset, mask) of a 3x3, stride 1, pad 1 DCNv3 core, with offsets of a few pixels."""
    points, size, group = 9, shape.size, shape.group
    size_out = dcnv3_output_size(size, 3, 1, 1, 1)
    input = torch.randn(batch, size, size, group * shape.group_channels, device=device, dtype=dtype)
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


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, 1); infinite if `actual` has a NaN or an infinity."""
    if not torch.isfinite(actual).all():
        return math.inf
    scale = expected.abs().max().clamp_min(1.0)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def input_set_count(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to rotate over so that the timed calls read memory, not L2 (4x the L2 size, at most 8)."""
    if device.type != "cuda":
        return 1
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * MIB
    return max(1, min(8, math.ceil(4 * l2_bytes / bytes_per_set)))


def _forward(tensors: tuple[torch.Tensor, ...], arguments: tuple, backend: str) -> torch.Tensor:
    with torch.no_grad():
        return dcnv3_core(*tensors, *arguments, backend=backend)


def _forward_backward(leaves: list[torch.Tensor], arguments: tuple, backend: str) -> tuple[torch.Tensor, ...]:
    output = dcnv3_core(*leaves, *arguments, backend=backend)
    return torch.autograd.grad(output, leaves, torch.ones_like(output))


def _rotating(functions: list[Callable[[], object]]) -> Callable[[], object]:
    cycle = itertools.cycle(functions)
    return lambda: next(cycle)()


def bench_op_case(
    shape: StageShape, dtype_name: str, backends: Iterable[str], device: torch.device, batch: int,
    copy_bandwidth: float, timing: Timing = Timing(),
) -> Iterator[dict]:
    """One row per backend for `shape` in `dtype_name`; a backend that fails gives a row with its `error`.
    `parity_ok`: the forward is within `OP_TOLERANCE` of the float32 PyTorch backend; `None` when not checked (out
    of memory: a capacity limit, not a wrong result)."""
    dtype = getattr(torch, dtype_name)
    arguments = op_arguments(shape)
    first = op_tensors(batch, shape, dtype, device)
    sets = [first] + [op_tensors(batch, shape, dtype, device)
                      for _ in range(input_set_count(compulsory_bytes(first, backward=False), device) - 1)]
    reference = _forward(tuple(t.float() for t in first), arguments, "pytorch")
    for backend in backends:
        row = {"kind": "op", "variant": shape.variant, "stage": shape.stage, "shape": shape.name, "batch": batch,
               "dtype": dtype_name, "backend": backend, "input_sets": len(sets)}
        failed = False
        try:
            row["parity_error"] = relative_error(_forward(first, arguments, backend), reference)
            forward = _rotating([functools.partial(_forward, t, arguments, backend) for t in sets])
            leaves = [[t.clone().requires_grad_() for t in tensors] for tensors in sets]
            both = _rotating([functools.partial(_forward_backward, t, arguments, backend) for t in leaves])
            for name, function, backward in (("fwd", forward, False), ("fwd_bwd", both, True)):
                seconds = median_seconds(function, device, timing)
                rate = compulsory_bytes(first, backward) / seconds
                row[f"{name}_ms"], row[f"{name}_gbps"] = seconds * 1e3, rate / 1e9
                row[f"{name}_copy_fraction"] = rate / copy_bandwidth
                row[f"{name}_peak_mib"] = peak_memory_mib(function, device)
            del leaves
        except torch.cuda.OutOfMemoryError as error:  # a capacity limit at this shape: reported, not a wrong result
            row["error"] = error_text(error)
        except Exception as error:  # one backend's failure is a result, not the end of the benchmark
            row["error"], failed = error_text(error), True
        if "parity_error" in row and not failed:
            row["parity_ok"] = row["parity_error"] <= OP_TOLERANCE[dtype_name]
        else:
            row["parity_ok"] = False if failed else None
        yield row


def bench_ops(
    variants: Iterable[str], dtypes: Iterable[str], backends: list[str], device: torch.device, batch: int,
    copy_bandwidth: float, small: bool = False, timing: Timing = Timing(), deadline: float | None = None,
    stages: Iterable[int] = range(4),
) -> Iterator[dict]:
    """`bench_op_case` rows for `stages` of `variants` and every dtype, in that order. With a `deadline`
    (`time.time()` value), a case is started only while at least twice the previous case's duration remains; the
    cases left out then give one `{"kind": "skipped"}` row."""
    cases = [(shape, dtype) for variant in variants for shape in stage_shapes(variant, small)
             if shape.stage in stages for dtype in dtypes]
    last_case_s = 0.0
    for index, (shape, dtype) in enumerate(cases):
        if deadline is not None and time.time() + 2 * last_case_s > deadline:
            left = [f"{s.variant.upper()} stage {s.stage} {d}" for s, d in cases[index:]]
            yield {"kind": "skipped", "what": f"op cases {', '.join(left)}", "reason": "time limit of the part"}
            return
        start = time.time()
        yield from bench_op_case(shape, dtype, backends, device, batch, copy_bandwidth, timing)
        last_case_s = time.time() - start
        if device.type == "cuda":
            torch.cuda.empty_cache()


def model_config(variant: str, small: bool, **overrides) -> InternImageConfig:
    """A released variant's configuration, or a tiny model (width 16, one layer per stage, 32×32) when `small`."""
    if small:
        return InternImageConfig(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], image_size=32, **overrides)
    return InternImageConfig.from_variant(VARIANTS[variant], **overrides)


def build_classifier(
    config: InternImageConfig, device: torch.device, seed: int = 0
) -> InternImageForImageClassification:
    torch.manual_seed(seed)
    return InternImageForImageClassification(config).to(device).eval()


def use_backend(model: torch.nn.Module, backend: str) -> None:
    """Point every DCNv3 layer of `model` at `backend`."""
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend


def cuda_graph(model: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[Callable[[], None], torch.Tensor]:
    """`model(pixel_values).logits` captured as a CUDA graph: its replay function and the output tensor it fills."""
    static_input = pixel_values.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():  # warm-up (and Triton autotuning) outside the capture
        for _ in range(3):
            model(static_input)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_output = model(static_input).logits
    return graph.replay, static_output


def bench_inference(
    model: torch.nn.Module, name: str, backend: str, batch: int, device: torch.device, timing: Timing = Timing(),
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None, modes: Iterable[str] = ("eager",),
) -> Iterator[dict]:
    """Inference rows of `model` on `backend` at `batch`, one per mode: "eager", "cuda graph" (captured once,
    replayed). `reference` maps the float32 input to the float32 reference logits (PyTorch backend) for a parity
    check. A failed capture gives a row with its `error` and `parity_ok` None (a speed option, not a wrong result)."""
    dtype = next(model.parameters()).dtype
    size = model.config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(batch))
    pixel_values = pixels.to(dtype)
    use_backend(model, backend)
    expected = reference(pixels) if reference is not None else None
    for mode in modes:
        row = {"kind": "inference", "model": name, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
               "batch": batch, "mode": mode}
        try:
            with torch.no_grad():
                if mode == "eager":
                    function = functools.partial(model, pixel_values)
                    logits = model(pixel_values).logits
                else:
                    function, logits = cuda_graph(model, pixel_values)
                    function()
                seconds = median_seconds(function, device, timing)
            row.update(ms=seconds * 1e3, images_per_s=batch / seconds, peak_mib=peak_memory_mib(function, device))
            if expected is not None:
                row["parity_error"] = relative_error(logits.float(), expected)
                row["parity_ok"] = row["parity_error"] <= MODEL_TOLERANCE[row["dtype"]]
        except Exception as error:  # e.g. a backend that cannot be captured in a CUDA graph
            row["error"], row["parity_ok"] = error_text(error), None if mode == "cuda graph" else False
        yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --small, as a smoke test)")
    parser.add_argument("--small", action="store_true", help="tiny shapes and models (CPU smoke test)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=64, help="op batch size")
    parser.add_argument("--model-batch", type=int, default=128, help="model throughput batch size")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: nothing to benchmark. For a CPU smoke test run "
              "`TRITON_INTERPRET=1 python benchmarks/bench_dcnv3.py --device cpu --small`.")
        return
    if device.type == "cpu" and not args.small:
        parser.error("--device cpu needs --small (the full shapes take hours on CPU, and Triton only interprets)")
    timing = SMOKE_TIMING if args.small else Timing()
    batch, model_batch = (2, 2) if args.small else (args.batch, args.model_batch)

    for name, reason in backend_availability(device).items():
        if reason is not None:
            print(f"# backend {name}: unavailable ({reason})")
    backends = available_backends(device)
    info = environment(device, 64 if args.small else 2048)
    print(f"# {environment_line(info)}; backends {backends}")
    rows = []
    for row in bench_ops(args.variants, args.dtypes, backends, device, batch, info["copy_gbps"] * 1e9, args.small,
                         timing):
        rows.append(row)
        print(op_table([row]).splitlines()[-1], flush=True)
    print("\n" + op_table(rows))
    if args.skip_model:
        return
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    for variant in MODEL_VARIANTS:
        model = build_classifier(model_config(variant, args.small), device).to(dtype)
        name = f"{variant.upper()} {model.config.image_size}"
        for backend in backends:
            for size in (model_batch, 1):
                modes = ("eager", "cuda graph") if device.type == "cuda" else ("eager",)
                rows += bench_inference(model, name, backend, size, device, timing, modes=modes)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n" + inference_table(rows))


if __name__ == "__main__":
    main()
