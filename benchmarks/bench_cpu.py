"""CPU benchmark: InternImage-T against the frozen clean-room reference of the official model, and the matmul roofline.

The reference (`tests/official_reference.py`) is the official formulation of the whole model (Sequential norms with
their permutes, the `grid_sample` DCNv3 op, the official head) and shares no code with the model, so a speed-up in
the model never speeds it up. Both get the same weights (random, offsets of a few pixels), loaded through the
converter's key mapping. Every comparison runs interleaved in one process (alternating order, median of `--reps`).

Next to each time the table prints the achieved GFLOP/s (FLOPs counted by `torch.utils.flop_counter` on one forward,
or forward + backward, of the reference: the model computes the same products, partly as fused oneDNN calls the
counter does not see; the same count for every row of a case, so GFLOP/s is proportional to speed)
and its fraction of the matmul rate measured in the same interleaved loop: the matrix products of the reference's
forward (or training step), every `addmm`/`mm` shape, replayed alone as plain `torch.mm` in float32 or bfloat16.
Peak = median over 3 calls of the resident-memory high-water mark one call adds (Linux /proc/self/status).

    python benchmarks/bench_cpu.py                         # everything (torch.compile takes minutes)
    python benchmarks/bench_cpu.py --skip compile --reps 5
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dcnv3_oracle import oracle_dcnv3_core  # noqa: E402
from official_reference import InternImage as ReferenceInternImage  # noqa: E402

from convert_checkpoints import config_from_official_kwargs, rename_official_key  # noqa: E402
from dcnv3_pytorch import dcnv3_core_pytorch  # noqa: E402
from modeling_internimage import InternImageForImageClassification  # noqa: E402

# The official constructor arguments of InternImage-T (classification/configs/internimage_t_1k_224.yaml).
T_KWARGS = {
    "channels": 64, "depths": [4, 4, 18, 4], "groups": [4, 8, 16, 32], "num_classes": 1000, "layer_scale": None,
    "offset_scale": 1.0, "post_norm": False, "mlp_ratio": 4.0, "drop_path_rate": 0.1,
}
# (height = width, channels, groups) of the DCNv3 core in the four stages of InternImage-T at 224x224.
T_STAGE_SHAPES = ((56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32))
MEMORY_REPS = 3
SECTIONS = ("fp32", "batch1", "bf16", "compile", "op", "train")


# ------------------------------------------------------------------------------------------------------ measuring


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory (MiB) that `fn` adds: the kernel's high-water mark (VmHWM, reset through
    /proc/self/clear_refs) minus the resident size before the call, after returning freed heap to the system.
    Measured this way (not with allocator hooks) it also counts the buffers of torch.compile-generated code."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def median_peaks(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median peak memory of each function over `MEMORY_REPS` calls (the high-water mark varies with the heap)."""
    peaks = {name: [] for name in fns}
    for _ in range(MEMORY_REPS):
        for name, fn in fns.items():
            peaks[name].append(peak_memory_mib(fn))
    return {name: statistics.median(values) for name, values in peaks.items()}


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time (s) of each function, run in alternating order within each repetition."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` as `torch.utils.flop_counter` counts them (matrix products and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class MatrixProducts(TorchDispatchMode):
    """The matrix products (`addmm`, `mm`) dispatched while active, replayable alone as plain `torch.mm` of the
    same shapes on random operands: the matmul roofline of the recorded computation."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
            first, second = args[-2], args[-1]
            self.shapes.append((first.shape[0], first.shape[1], second.shape[1]))
        return func(*args, **(kwargs or {}))

    @property
    def flops(self) -> int:
        return sum(2 * m * k * n for m, k, n in self.shapes)

    def replay(self, dtype: torch.dtype) -> Callable[[], None]:
        """A function running every recorded product once in `dtype`."""
        generator = torch.Generator().manual_seed(0)
        operands = [
            (torch.randn(m, k, generator=generator).to(dtype), torch.randn(k, n, generator=generator).to(dtype))
            for m, k, n in self.shapes
        ]

        def run() -> None:
            for first, second in operands:
                torch.mm(first, second)

        return run


# ------------------------------------------------------------------------------------------------------ models


def build_models(seed: int = 0) -> tuple[torch.nn.Module, InternImageForImageClassification]:
    """The reference InternImage-T (official init, then offsets of a few pixels and non-uniform masks) and our
    model with the same weights, both in eval mode."""
    torch.manual_seed(seed)
    reference = ReferenceInternImage(**T_KWARGS).eval()
    with torch.no_grad():
        for level in reference.levels:
            for block in level.blocks:
                fan_in = block.dcn.channels
                block.dcn.offset.weight.normal_(0, 0.5 / fan_in**0.5)
                block.dcn.offset.bias.normal_(0, 1.0)
                block.dcn.mask.weight.normal_(0, 1 / fan_in**0.5)
    ours = InternImageForImageClassification(config_from_official_kwargs(T_KWARGS))
    ours.load_state_dict({rename_official_key(k): v for k, v in reference.state_dict().items()}, strict=True)
    return reference, ours.eval()


def bfloat16_model(model: InternImageForImageClassification) -> InternImageForImageClassification:
    """`from_pretrained(..., dtype=torch.bfloat16)` of the model saved to a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return InternImageForImageClassification.from_pretrained(folder, dtype=torch.bfloat16).eval()


# ------------------------------------------------------------------------------------------------------ reporting

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass
class Case:
    """Runs timed together: name -> (function, dtype of its matrix products), plus the replays of the recorded
    products in those dtypes (timed in the same interleaved loop, so they see the same machine load)."""

    title: str
    batch: int
    flops: int  # counted FLOPs of one call (the same for every run of the case)
    runs: dict[str, tuple[Callable[[], object], torch.dtype]]
    products: MatrixProducts
    baseline: str = "reference fp32"

    def measure(self, reps: int, memory: bool = True) -> None:
        dtypes = sorted({dtype for _, dtype in self.runs.values()}, key=str)
        replays = {f"matrix products alone {DTYPE_NAMES[d]}": self.products.replay(d) for d in dtypes}
        calls = {name: run for name, (run, _) in self.runs.items()}
        times = interleaved_medians({**calls, **replays}, reps)
        peaks = median_peaks(calls) if memory else {}
        rates = {d: self.products.flops / times[f"matrix products alone {DTYPE_NAMES[d]}"] / 1e9 for d in dtypes}
        base = times[self.baseline]
        print(f"\n## {self.title}")
        print(
            f"{self.flops / 1e9:.1f} GFLOP counted per call; the {len(self.products.shapes)} matrix products of the"
            f" reference ({self.products.flops / 1e9:.1f} GFLOP) alone: "
            + ", ".join(f"{rate:.0f} GFLOP/s in {DTYPE_NAMES[d]}" for d, rate in rates.items())
        )
        print("| run | ms | img/s | GFLOP/s | of matmul rate | peak MiB | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for name, (_, dtype) in self.runs.items():
            achieved = self.flops / times[name] / 1e9
            peak = f"{peaks[name]:.0f}" if name in peaks else "-"
            print(
                f"| {name} | {times[name] * 1e3:.1f} | {self.batch / times[name]:.2f} | {achieved:.1f} |"
                f" {achieved / rates[dtype]:.2f} ({DTYPE_NAMES[dtype]}) | {peak} | {base / times[name]:.2f}x |"
            )
        for name in replays:
            print(f"| {name} | {times[name] * 1e3:.1f} | | {self.products.flops / times[name] / 1e9:.1f} | 1.00 | | |")


# ------------------------------------------------------------------------------------------------------ sections


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.reference, self.ours = build_models()
        self._products: dict[int, MatrixProducts] = {}

    def pixels(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))

    def products(self, batch: int) -> MatrixProducts:
        """The matrix products of one reference forward at this batch size."""
        if batch not in self._products:
            self._products[batch] = MatrixProducts()
            with torch.no_grad(), self._products[batch]:
                self.reference(self.pixels(batch))
        return self._products[batch]

    def inference(self, batch: int, runs: dict[str, tuple[Callable, torch.dtype]], title: str) -> None:
        """Interleaved inference timings of `runs` (name -> (forward, matmul dtype)) and the fp32 reference."""
        pixel_values = self.pixels(batch)
        runs = {"reference fp32": (self.reference, torch.float32), **runs}
        calls = {name: (functools.partial(run, pixel_values), dtype) for name, (run, dtype) in runs.items()}
        with torch.no_grad():
            expected = self.reference(pixel_values)
            for name, (call, _) in list(calls.items())[1:]:
                print(f"{name}: max |logits - reference| = {(call().float() - expected).abs().max().item():.2e}")
            flops = counted_flops(lambda: self.reference(pixel_values))
            Case(title, batch, flops, calls, self.products(batch)).measure(self.args.reps)

    def fp32(self, batch: int) -> None:
        self.inference(
            batch, {"ours fp32": (lambda x: self.ours(x).logits, torch.float32)},
            f"InternImage-T, batch {batch}, 224x224, float32 eager",
        )

    def bf16(self) -> None:
        bf16 = bfloat16_model(self.ours)

        def autocast(pixel_values: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.ours(pixel_values).logits

        runs = {
            "ours fp32": (lambda x: self.ours(x).logits, torch.float32),
            "ours bf16 model": (lambda x: bf16(x.bfloat16()).logits, torch.bfloat16),
            "ours fp32 + bf16 autocast": (autocast, torch.bfloat16),
        }
        self.inference(self.args.batch, runs, f"InternImage-T, batch {self.args.batch}, 224x224, bfloat16 eager")

    def compile(self) -> None:
        bf16 = bfloat16_model(self.ours)
        compiled, compiled_bf16 = torch.compile(self.ours, fullgraph=True), torch.compile(bf16, fullgraph=True)
        runs = {
            "ours fp32 eager": (lambda x: self.ours(x).logits, torch.float32),
            "ours fp32 compiled": (lambda x: compiled(x).logits, torch.float32),
            "ours bf16 model eager": (lambda x: bf16(x.bfloat16()).logits, torch.bfloat16),
            "ours bf16 model compiled": (lambda x: compiled_bf16(x.bfloat16()).logits, torch.bfloat16),
        }
        start = time.perf_counter()
        with torch.no_grad():
            for name in ("ours fp32 compiled", "ours bf16 model compiled"):
                runs[name][0](self.pixels(self.args.batch))
        print(f"\ncompilation (first calls): {time.perf_counter() - start:.0f} s")
        self.inference(self.args.batch, runs, f"torch.compile(fullgraph=True), batch {self.args.batch}, 224x224")

    def op(self) -> None:
        print(f"\n## DCNv3 core alone, T stage shapes, batch {self.args.batch}, float32 (ms)")
        print("| stage (H, C, G) | fwd ours | fwd reference | speed-up | fwd+bwd ours | fwd+bwd reference | speed-up |")
        print("|---|---|---|---|---|---|---|")
        ops = {"ours": dcnv3_core_pytorch, "reference": oracle_dcnv3_core}
        for stage, (size, channels, groups) in enumerate(T_STAGE_SHAPES):
            inputs = _op_inputs(self.args.batch, size, channels, groups)
            op_args = (3, 3, 1, 1, 1, 1, 1, 1, groups, channels // groups, 1.0, 0)
            fwd, both = (
                interleaved_medians(
                    {name: functools.partial(run, op, inputs, op_args) for name, op in ops.items()}, self.args.reps
                )
                for run in (_forward, _forward_backward)
            )
            print(
                f"| {stage} {(size, channels, groups)} | {fwd['ours'] * 1e3:.2f} | {fwd['reference'] * 1e3:.2f} |"
                f" {fwd['reference'] / fwd['ours']:.2f}x | {both['ours'] * 1e3:.2f} | {both['reference'] * 1e3:.2f} |"
                f" {both['reference'] / both['ours']:.2f}x |"
            )

    def train(self) -> None:
        batch = self.args.batch
        pixel_values = self.pixels(batch)
        labels = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(0))
        models = {"reference fp32": self.reference, "ours fp32": self.ours}
        products = MatrixProducts()
        with products:
            F.cross_entropy(self.reference(pixel_values), labels).backward()
        flops = counted_flops(lambda: F.cross_entropy(self.reference(pixel_values), labels).backward())
        for model in models.values():
            model.zero_grad(set_to_none=True)
            model.train()
        runs = {name: (_training_step(model, pixel_values, labels), torch.float32) for name, model in models.items()}
        title = f"Training step (forward + backward + AdamW), batch {batch}, 224x224, float32"
        Case(title, batch, flops, runs, products).measure(self.args.reps)
        for model in models.values():
            model.eval()


def _op_inputs(batch: int, size: int, channels: int, groups: int) -> tuple[torch.Tensor, ...]:
    """Random (input, offset, mask) for the 3x3 core at one stage: offsets of a few pixels, softmaxed masks."""
    generator = torch.Generator().manual_seed(size)
    shape = (batch, size, size)
    values = torch.randn(*shape, channels, generator=generator)
    offset = torch.randn(*shape, groups * 18, generator=generator)
    mask = torch.randn(*shape, groups, 9, generator=generator).softmax(-1).flatten(-2)
    return values, offset, mask


def _forward(op: Callable, inputs: tuple[torch.Tensor, ...], op_args: tuple) -> None:
    with torch.no_grad():
        op(*inputs, *op_args)


def _forward_backward(op: Callable, inputs: tuple[torch.Tensor, ...], op_args: tuple) -> None:
    leaves = [t.detach().requires_grad_() for t in inputs]
    op(*leaves, *op_args).sum().backward()


def _training_step(model: torch.nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One AdamW step of `model` on fixed data (official defaults: weight decay 0.05)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05)

    def step() -> None:
        output = model(pixel_values)
        logits = output if isinstance(output, torch.Tensor) else output.logits
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "CPU")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{_cpu_name()}, {torch.get_num_threads()} threads, CPU capability"
        f" {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}, transformers"
        f" {transformers.__version__}, Python {platform.python_version()}"
    )
    bench = Bench(args)
    if "fp32" not in args.skip:
        bench.fp32(args.batch)
    if "batch1" not in args.skip:
        bench.fp32(1)
    if "bf16" not in args.skip:
        bench.bf16()
    if "compile" not in args.skip:
        bench.compile()
    if "op" not in args.skip:
        bench.op()
    if "train" not in args.skip:
        bench.train()


if __name__ == "__main__":
    main()
