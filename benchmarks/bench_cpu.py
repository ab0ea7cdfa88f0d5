"""CPU benchmark: InternImage-T forward with the PyTorch DCNv3 fallback vs the clean-room oracle, and the op alone.

The oracle (`tests/dcnv3_oracle.py`) is the official grid_sample formulation of the op inside the official DCNv3
module forward; the model is otherwise the same instance (same weights, same stem, MLPs, norms and head), so the
ratios measure the DCN core and the block forward code. Ours and the oracle run interleaved in one process, and
each time is the median over `--reps` repetitions. Peak memory is the median over 3 forwards of the resident-memory
high-water mark that one forward adds on top of the weights and the input (Linux: /proc/self/status after
/proc/self/clear_refs).

    python benchmarks/bench_cpu.py                      # batch 8, 224x224, eager + torch.compile, op alone
    python benchmarks/bench_cpu.py --no-compile --reps 3
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import gc
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dcnv3_oracle import oracle_dcnv3_core, oracle_dcnv3_module_forward  # noqa: E402

from configuration_internimage import InternImageConfig  # noqa: E402
from dcnv3_ops import dcnv3_core_pytorch  # noqa: E402
from modeling_internimage import InternImageDCNv3, InternImageForImageClassification  # noqa: E402

# (height = width, channels, groups) of the DCNv3 core in the four stages of InternImage-T at 224x224.
T_STAGE_SHAPES = ((56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32))
MEMORY_REPS = 3


def build_models(image_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """InternImage-T with random weights (offsets of a few pixels) and a copy running the oracle DCNv3 forward."""
    torch.manual_seed(0)
    model = InternImageForImageClassification(InternImageConfig(image_size=image_size)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, InternImageDCNv3):
                fan_in = module.channels
                module.offset.weight.normal_(0, 0.5 / fan_in**0.5)
                module.offset.bias.normal_(0, 1.0)
                module.mask.weight.normal_(0, 1 / fan_in**0.5)
    oracle = copy.deepcopy(model)
    for module in oracle.modules():
        if isinstance(module, InternImageDCNv3):
            module.forward = types.MethodType(oracle_dcnv3_module_forward, module)
    return model, oracle


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


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median wall time (s) of each function, run in alternating order within each repetition."""
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_model(args: argparse.Namespace, compiled: bool) -> None:
    model, oracle = build_models(args.image_size)
    pixel_values = torch.randn(args.batch, 3, args.image_size, args.image_size)
    if compiled:
        model, oracle = torch.compile(model, fullgraph=True), torch.compile(oracle, fullgraph=True)
    runs = {"ours": lambda: model(pixel_values).logits, "oracle": lambda: oracle(pixel_values).logits}
    with torch.no_grad():
        start = time.perf_counter()
        difference = (runs["ours"]() - runs["oracle"]()).abs().max().item()
        warmup = time.perf_counter() - start
        for run in runs.values():
            run()
        times = interleaved_medians(runs, args.reps)
        peaks = {name: [] for name in runs}
        for _ in range(MEMORY_REPS):  # the high-water mark varies with the heap's state: median of a few
            for name, run in runs.items():
                peaks[name].append(peak_memory_mib(run))
        memory = {name: statistics.median(values) for name, values in peaks.items()}
    mode = "compiled" if compiled else "eager"
    print(f"\n## Whole model, InternImage-T, batch {args.batch}, {args.image_size}x{args.image_size}, {mode}")
    print(f"first calls (incl. compilation): {warmup:.1f} s; max |logits ours - oracle| = {difference:.2e}")
    for name in runs:
        print(
            f"{name:>7}: {times[name] * 1000:8.1f} ms/batch  {args.batch / times[name]:7.2f} img/s"
            f"  peak {memory[name]:7.1f} MiB"
        )
    print(
        f"speed-up {times['oracle'] / times['ours']:.2f}x, peak memory ours/oracle "
        f"{memory['ours'] / memory['oracle']:.2f}"
    )


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


def bench_op(args: argparse.Namespace) -> None:
    print(f"\n## DCNv3 core alone, T stage shapes, batch {args.batch}, eager (ms, median of {args.reps})")
    print("stage  (H, C, G)        fwd ours  fwd oracle  ratio  | fwd+bwd ours  fwd+bwd oracle  ratio")
    ops = {"ours": dcnv3_core_pytorch, "oracle": oracle_dcnv3_core}
    reps = args.reps
    for stage, (size, channels, groups) in enumerate(T_STAGE_SHAPES):
        inputs = _op_inputs(args.batch, size, channels, groups)
        op_args = (3, 3, 1, 1, 1, 1, 1, 1, groups, channels // groups, 1.0, 0)
        fwd, both = (
            interleaved_medians({name: functools.partial(run, op, inputs, op_args) for name, op in ops.items()}, reps)
            for run in (_forward, _forward_backward)
        )
        print(
            f"{stage}      {(size, channels, groups)!s:15} {fwd['ours'] * 1e3:8.2f}  {fwd['oracle'] * 1e3:10.2f}"
            f"  {fwd['oracle'] / fwd['ours']:5.2f}  | {both['ours'] * 1e3:12.2f}  {both['oracle'] * 1e3:14.2f}"
            f"  {both['oracle'] / both['ours']:5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=7, help="repetitions per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model measurements")
    parser.add_argument("--no-op", action="store_true", help="skip the op-alone measurements")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.no_model:
        bench_model(args, compiled=False)
        if not args.no_compile:
            bench_model(args, compiled=True)
    if not args.no_op:
        bench_op(args)


if __name__ == "__main__":
    main()
