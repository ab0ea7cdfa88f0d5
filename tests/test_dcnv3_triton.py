"""The Triton DCNv3 kernels (`dcnv3_triton.py`).

CPU: the kernels run in the Triton interpreter, which must be switched on before triton compiles anything, so
`test_kernels_under_the_interpreter` re-runs this file in a subprocess with `TRITON_INTERPRET=1`; there the
`interpreter` tests compare forward and all three gradients with the official fixtures and the PyTorch backend.
GPU (`@pytest.mark.gpu`, skipped without CUDA): parity on real stage shapes in every dtype, large batches,
> 2**31 elements, opcheck. Whole-model parity, batch > 256 and torch.compile across backends: tests/test_gpu_model.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import perturb_sampling  # noqa: E402
from dcnv3_non_finite import check_against_the_official_formulation, non_finite_cases  # noqa: E402

import dcnv3_triton  # noqa: E402
from configuration_internimage import InternImageConfig  # noqa: E402
from dcnv3_ops import dcnv3_core, dcnv3_core_pytorch, dcnv3_output_size  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "dcnv3_op"
HYPER_PARAMETERS = (
    "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w", "group",
    "group_channels", "offset_scale", "remove_center",
)
INTERPRETING = dcnv3_triton.INTERPRETING
needs_triton = pytest.mark.skipif(not dcnv3_triton.is_available(), reason="triton is not installed")
interpreter = pytest.mark.skipif(
    not (INTERPRETING and dcnv3_triton.is_available()),
    reason="runs inside test_kernels_under_the_interpreter (TRITON_INTERPRET=1 subprocess)",
)
compiled_triton = pytest.mark.skipif(
    not dcnv3_triton.is_available() or INTERPRETING, reason="needs triton, compiled (not under TRITON_INTERPRET=1)"
)
# Relative tolerance (to the reference's largest magnitude) per dtype, for outputs and gradients.
RELATIVE_TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def random_case(
    batch: int, height: int, width: int, group: int, group_channels: int, kernel: int = 3, stride: int = 1,
    pad: int = 1, dilation: int = 1, remove_center: int | bool = 0, offset_std: float = 3.0,
    offset_scale: float = 1.0, device: str = "cpu", seed: int = 0,
) -> tuple[tuple[torch.Tensor, ...], tuple]:
    """float64 (input, offset, mask) and the op's hyper-parameters; offsets large enough to leave the image."""
    generator = torch.Generator().manual_seed(seed)
    height_out = dcnv3_output_size(height, kernel, stride, pad, dilation)
    width_out = dcnv3_output_size(width, kernel, stride, pad, dilation)
    points = kernel * kernel - int(remove_center)
    input = torch.randn(batch, height, width, group * group_channels, generator=generator, dtype=torch.float64)
    offset = offset_std * torch.randn(batch, height_out, width_out, group * points * 2, generator=generator,
                                      dtype=torch.float64)
    mask = torch.randn(batch, height_out, width_out, group, points, generator=generator, dtype=torch.float64)
    mask = mask.softmax(-1).flatten(-2)
    arguments = (kernel, kernel, stride, stride, pad, pad, dilation, dilation, group, group_channels, offset_scale,
                 remove_center)
    return tuple(t.to(device) for t in (input, offset, mask)), arguments


def forward_and_gradients(op, tensors: tuple[torch.Tensor, ...], arguments: tuple, grad_weight: torch.Tensor):
    """Output and the gradients of `sum(output * grad_weight)` w.r.t. input, offset and mask."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    output = op(*leaves, *arguments)
    gradients = torch.autograd.grad((output * grad_weight.to(output.dtype)).sum(), leaves)
    return output, gradients


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    scale = expected.abs().max().clamp_min(1.0)
    error = ((actual.double() - expected.double()).abs().max() / scale).item()
    assert error < tolerance, f"{what}: relative error {error:.2e} >= {tolerance:.0e}"


def assert_matches_reference(tensors, arguments, dtype: torch.dtype) -> None:
    """Triton in `dtype` against the PyTorch op in float64 on the same (dtype-rounded) inputs."""
    rounded = tuple(t.to(dtype) for t in tensors)
    reference_inputs = tuple(t.double() for t in rounded)
    grad_weight = torch.randn(dcnv3_core_pytorch(*reference_inputs, *arguments).shape, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(1)).to(tensors[0].device)
    expected = forward_and_gradients(dcnv3_core_pytorch, reference_inputs, arguments, grad_weight)
    actual = forward_and_gradients(dcnv3_triton.dcnv3_triton, rounded, arguments, grad_weight)
    assert actual[0].dtype == dtype and all(g.dtype == dtype for g in actual[1])
    tolerance = RELATIVE_TOLERANCE[dtype]
    assert_close_relative(actual[0], expected[0], tolerance, f"output {dtype}")
    for name, got, want in zip(("input", "offset", "mask"), actual[1], expected[1]):
        assert_close_relative(got, want, tolerance, f"grad_{name} {dtype}")


# ---------------------------------------------------------------- CPU, without the interpreter


def test_module_reports_triton_availability():
    assert dcnv3_triton.is_available() == (sys.modules.get("triton") is not None)


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="checks the error raised without the interpreter")
def test_cpu_tensors_without_interpreter_raise_a_clear_error():
    (input, offset, mask), arguments = random_case(1, 4, 4, 1, 4)
    with pytest.raises(RuntimeError, match="CUDA tensors.*TRITON_INTERPRET=1"):
        dcnv3_core(input, offset, mask, *arguments, backend="triton")
    with pytest.raises(RuntimeError, match="CUDA tensors.*TRITON_INTERPRET=1"):
        dcnv3_triton.dcnv3_triton(input, offset, mask, *arguments)


@needs_triton
def test_bad_shapes_are_rejected_with_the_expected_shape():
    (input, offset, mask), arguments = random_case(1, 4, 4, 2, 4)
    with pytest.raises(ValueError, match=r"offset must have shape \(1, 4, 4, 36\)"):
        dcnv3_triton.dcnv3_triton(input, offset[..., :-2], mask, *arguments)
    with pytest.raises(ValueError, match="group \\* group_channels = 8"):
        dcnv3_triton.dcnv3_triton(input[..., :6], offset, mask, *arguments)


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="this test starts the interpreter run")
def test_kernels_under_the_interpreter():
    environment = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_interpreter_"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, result.stdout[-2000:]


# ---------------------------------------------------------------- CPU, in the interpreter subprocess


@interpreter
@pytest.mark.parametrize("case", sorted(p.name for p in FIXTURES.glob("case_*.pt")))
def test_interpreter_matches_official_fixture(case):
    fixture = torch.load(FIXTURES / case, weights_only=True)
    tensors = tuple(fixture[name].float() for name in ("input", "offset", "mask"))
    arguments = tuple(fixture[name] for name in HYPER_PARAMETERS)
    output, gradients = forward_and_gradients(dcnv3_triton.dcnv3_triton, tensors, arguments, fixture["grad_weight"])
    assert (output.double() - fixture["output_f64ref"]).abs().max().item() < 2e-5
    for name, gradient in zip(("input", "offset", "mask"), gradients):
        assert (gradient.double() - fixture[f"grad_{name}_f64ref"]).abs().max().item() < 5e-5, name


@interpreter
@pytest.mark.parametrize(
    "shape, options",
    [
        ((2, 5, 6, 2, 12), {"remove_center": 1}),  # non-power-of-two channels, remove_center
        ((1, 7, 6, 1, 4), {"kernel": 5, "pad": 2, "stride": 2, "dilation": 2, "remove_center": True}),
        ((1, 6, 5, 3, 4), {"stride": 2, "pad": 0, "offset_scale": 0.5}),
    ],
    ids=["cg12-remove-center", "k5-s2-d2-bool-center", "stride2-pad0-groups3"],
)
def test_interpreter_matches_pytorch_float64(shape, options):
    tensors, arguments = random_case(*shape, **options)
    grad_weight = torch.randn(dcnv3_core_pytorch(*tensors, *arguments).shape, dtype=torch.float64)
    expected = forward_and_gradients(dcnv3_core_pytorch, tensors, arguments, grad_weight)
    actual = forward_and_gradients(dcnv3_triton.dcnv3_triton, tensors, arguments, grad_weight)
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=1e-12)
    for got, want in zip(actual[1], expected[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interpreter_half_precision_matches_float64(dtype):
    tensors, arguments = random_case(1, 5, 6, 2, 8, seed=3)
    assert_matches_reference(tensors, arguments, dtype)


@interpreter
def test_interpreter_mixed_dtypes_keep_each_gradient_dtype():
    """Under autocast the offset/mask projections can differ in dtype from the input: each keeps its own."""
    (input, offset, mask), arguments = random_case(1, 4, 4, 1, 4)
    leaves = [input.half().requires_grad_(), offset.float().requires_grad_(), mask.float().requires_grad_()]
    output = dcnv3_triton.dcnv3_triton(*leaves, *arguments)
    output.float().sum().backward()
    assert output.dtype == torch.float16
    assert [leaf.grad.dtype for leaf in leaves] == [torch.float16, torch.float32, torch.float32]
    expected = dcnv3_core_pytorch(input.half().double(), offset, mask, *arguments)
    assert_close_relative(output, expected, RELATIVE_TOLERANCE[torch.float16], "mixed-dtype output")


@interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy computing inf - inf
@non_finite_cases(torch.float32)
def test_interpreter_non_finite_values_match_the_official_formulation(name, value, dtype):
    """NaN or ±inf in input, offsets or mask: the same non-finite outputs and gradients as the official grid_sample
    formulation (NaN for a NaN or infinite position), no read outside the input (the interpreter checks bounds)."""
    check_against_the_official_formulation(dcnv3_triton.dcnv3_triton, name, value, dtype)


# ---------------------------------------------------------------- GPU


def stage_shapes(variant: str) -> list[tuple[int, int, int, int]]:
    """(height, width, group, group_channels) of the DCNv3 input in each stage of a released variant."""
    config = InternImageConfig.from_variant(variant)
    shapes = []
    for stage, groups in enumerate(config.groups):
        size = config.image_size // 4 // 2**stage
        shapes.append((size, size, groups, config.channels * 2**stage // groups))
    return shapes


GPU_STAGES = [
    (variant, stage, shape)
    for variant in ("internimage_t_1k_224", "internimage_l_22kto1k_384", "internimage_h_22kto1k_640")
    for stage, shape in enumerate(stage_shapes(variant))
]


@pytest.mark.gpu
@compiled_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant, stage, shape", GPU_STAGES, ids=[f"{v.split('_')[1]}-s{s}" for v, s, _ in GPU_STAGES])
def test_gpu_stage_shapes_match_pytorch(variant, stage, shape, dtype):
    height, width, group, group_channels = shape
    tensors, arguments = random_case(2, height, width, group, group_channels, offset_std=4.0, device="cuda",
                                     seed=int(torch.randint(0, 2**31, ())))
    assert_matches_reference(tensors, arguments, dtype)


@pytest.mark.gpu
@compiled_triton
@pytest.mark.parametrize(
    "options", [{"remove_center": 1}, {"kernel": 5, "pad": 2, "stride": 2, "dilation": 2, "remove_center": True}]
)
def test_gpu_options_and_batch_above_256(options):
    tensors, arguments = random_case(300, 9, 11, 2, 12, device="cuda", **options)
    assert_matches_reference(tensors, arguments, torch.float32)


@pytest.mark.gpu
@compiled_triton
def test_gpu_fixtures():
    for path in sorted(FIXTURES.glob("case_*.pt")):
        fixture = torch.load(path, weights_only=True)
        tensors = tuple(fixture[name].float().cuda() for name in ("input", "offset", "mask"))
        arguments = tuple(fixture[name] for name in HYPER_PARAMETERS)
        output, gradients = forward_and_gradients(
            dcnv3_triton.dcnv3_triton, tensors, arguments, fixture["grad_weight"].cuda()
        )
        assert (output.double().cpu() - fixture["output_f64ref"]).abs().max().item() < 2e-5, path.name
        for name, gradient in zip(("input", "offset", "mask"), gradients):
            error = (gradient.double().cpu() - fixture[f"grad_{name}_f64ref"]).abs().max().item()
            assert error < 5e-5, f"{path.name} grad_{name}"


@pytest.mark.gpu
@compiled_triton
def test_gpu_more_than_2_31_elements():
    """Input of 2**31 + extra elements (fp16): the last images must equal the fallback on those images alone."""
    batch, size, group, group_channels = 132, 128, 8, 128  # 132 * 128 * 128 * 1024 > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs about 20 GiB of GPU memory")
    generator = torch.Generator(device="cuda").manual_seed(0)
    input = torch.randn(batch, size, size, group * group_channels, device="cuda", dtype=torch.float16,
                        generator=generator)
    assert input.numel() > 2**31
    offset = 4 * torch.randn(batch, size, size, group * 18, device="cuda", dtype=torch.float16, generator=generator)
    mask = torch.rand(batch, size, size, group * 9, device="cuda", dtype=torch.float16, generator=generator)
    arguments = (3, 3, 1, 1, 1, 1, 1, 1, group, group_channels, 1.0, 0)
    output = dcnv3_triton.dcnv3_triton(input, offset, mask, *arguments)
    tail = slice(batch - 2, batch)
    expected = dcnv3_core_pytorch(input[tail].float(), offset[tail].float(), mask[tail].float(), *arguments)
    assert_close_relative(output[tail], expected, RELATIVE_TOLERANCE[torch.float16], "tail of a > 2**31 tensor")


@pytest.mark.gpu
@compiled_triton
@non_finite_cases(torch.float32, torch.float64)
def test_gpu_non_finite_values_match_the_official_formulation(name, value, dtype):
    check_against_the_official_formulation(dcnv3_triton.dcnv3_triton, name, value, dtype, device="cuda")


def perturbed_classifier(backend: str) -> torch.nn.Module:
    """A tiny classifier (eval mode) whose DCNv3 offsets and masks are perturbed away from the official
    initialisation, where offsets are zero and masks uniform so that every point samples the integer grid: offsets of
    a pixel or two (fractional, many corners outside the small maps) and masks that differ between points. Few
    groups and blocks: the interpreter runs one program per image row and group."""
    from modeling_internimage import InternImageForImageClassification

    config = InternImageConfig(channels=8, depths=[1, 1, 1, 1], groups=[1, 2, 2, 4], num_labels=10,
                               dcn_backend=backend)
    torch.manual_seed(0)
    return perturb_sampling(InternImageForImageClassification(config)).eval()


def logits_and_gradients(
    model: torch.nn.Module, pixel_values: torch.Tensor, forward=None
) -> dict[str, torch.Tensor]:
    """Logits of `forward` (default: `model`), and the gradients of a weighted sum of them w.r.t. the pixels and
    every parameter of `model`."""
    model.zero_grad()
    pixel_values = pixel_values.clone().requires_grad_()
    logits = (model if forward is None else forward)(pixel_values).logits
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits.device)
    (logits * weight).sum().backward()
    gradients = {f"grad {name}": parameter.grad for name, parameter in model.named_parameters()}
    return {"logits": logits.detach(), "grad pixel_values": pixel_values.grad, **gradients}


def assert_same_results(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tolerance: float) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert_close_relative(actual[name], value, tolerance, name)


def check_whole_model_matches_pytorch_backend(pixel_values: torch.Tensor, compile_backend: str | None = None) -> None:
    """Logits and all gradients of the perturbed model on Triton (eager, or compiled with `compile_backend` and
    fullgraph=True, which fails on any graph break) against the PyTorch backend with the same weights (on CPU, under
    the interpreter; tests/test_gpu_model.py does the same on CUDA for every backend)."""
    from modeling_internimage import InternImageDCNv3

    triton_model, pytorch_model = (perturbed_classifier(backend) for backend in ("triton", "pytorch"))
    offsets = []
    for module in pytorch_model.modules():
        if isinstance(module, InternImageDCNv3):
            module.offset.register_forward_hook(lambda linear, args, output: offsets.append(output.detach()))
    expected = logits_and_gradients(pytorch_model, pixel_values)
    offsets = torch.cat([offset.flatten() for offset in offsets])
    assert (offsets.frac() != 0).float().mean() > 0.99 and offsets.abs().max() > 2, "not a deformable case"
    for name in ("dcn.offset.weight", "dcn.mask.weight"):  # the op's offset and mask gradients are exercised
        assert sum(value.abs().sum() for key, value in expected.items() if key.endswith(name)) > 0, name
    forward = None
    if compile_backend is not None:
        torch._dynamo.reset()
        forward = torch.compile(triton_model, backend=compile_backend, fullgraph=True)
    assert_same_results(logits_and_gradients(triton_model, pixel_values, forward), expected, 1e-4)


@interpreter
def test_interpreter_whole_model_eager_and_compiled_match_pytorch_backend():
    """Compiled with aot_eager: dynamo and AOT autograd through the Triton operators (inductor's C++ build is left to
    the GPU test); one image of 16x16 pixels (stage maps of 4x4 down to 1x1), as the interpreter is slow."""
    pixel_values = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    check_whole_model_matches_pytorch_backend(pixel_values)
    check_whole_model_matches_pytorch_backend(pixel_values, compile_backend="aot_eager")


@interpreter
def test_interpreter_nan_input_gives_nan_logits():
    """A NaN pixel makes the logits NaN without raising (one image: the interpreter is slow; the model tests check
    on GPU that the other images of the batch keep finite logits)."""
    pixel_values = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pixel_values[0, :, 3, 5] = float("nan")
    with torch.no_grad():
        assert perturbed_classifier("triton")(pixel_values).logits.isnan().all()


@pytest.mark.gpu
@compiled_triton
def test_gpu_opcheck():
    tensors, arguments = random_case(2, 6, 7, 2, 12, device="cuda")
    tensors = [t.float().requires_grad_() for t in tensors]
    torch.library.opcheck(torch.ops.internimage.dcnv3_triton_forward.default, (*tensors, *arguments))


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="compiles the kernels with the real compiler, not the interpreter")
@pytest.mark.parametrize("dtype, kernel, remove_center", [("fp16", 3, 1)])
def test_kernels_compile_for_sm90_without_a_gpu(dtype, kernel, remove_center):
    """The interpreter accepts Python the compiler rejects (e.g. loops over tuples): build sm_90 code on the host."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    scalars = ("height", "width", "height_out", "width_out", "group", "group_channels", "stride_h", "stride_w",
               "pad_h", "pad_w", "dilation_h", "dilation_w", "center_h", "center_w", "NUM_POINTS_KEY")
    constexprs = {"KERNEL_H": kernel, "KERNEL_W": kernel, "REMOVE_CENTER": remove_center, "BLOCK_C": 16,
                  "ACC_DTYPE": dcnv3_triton.tl.float32, "BLOCK_W": 16}
    for autotuner in (dcnv3_triton._dcnv3_forward_kernel, dcnv3_triton._dcnv3_backward_kernel):
        function = autotuner.fn
        signature = {name: "constexpr" if name in constexprs else "i32" if name in scalars else "fp32"
                     if name == "offset_scale" else "*fp32" if name == "grad_input_ptr" else f"*{dtype}"
                     for name in function.arg_names}
        source = ASTSource(fn=function, signature=signature,
                           constexprs={(function.arg_names.index(name),): value for name, value in constexprs.items()})
        compiled = dcnv3_triton.triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert ".entry" in compiled.asm["ptx"]
