"""The optional DCNv3 CUDA extension (`dcnv3_cuda/`).

CPU (always): the build-environment checks of `dcnv3_cuda/build_utils.py`, the dispatch's answers when the
extension is missing or gets CPU tensors, and the kernels themselves compiled for the host by g++ (one std::thread
per CUDA thread) against the official fixtures and the PyTorch backend. With the extension importable: its own
CPU-tensor error, fake-tensor shapes and a torch.compile trace on meta tensors. GPU (skipped without CUDA and the
extension): parity with the official fixtures and the PyTorch backend in every dtype, gradcheck, batch 300,
whole-model parity across backends, torch.compile, 64-bit indexing.
Building the extension is checked by `.ci/build_cuda_extension.sh`, which then runs this file with it importable.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dcnv3_non_finite import (  # noqa: E402
    ARGUMENTS,
    ATOL,
    assert_same_non_finite,
    check_against_the_official_formulation,
    forward_and_gradients,
    non_finite_cases,
    poisoned_case,
)
from dcnv3_oracle import oracle_dcnv3_core  # noqa: E402

import dcnv3_ops  # noqa: E402
from dcnv3_ops import dcnv3_core, dcnv3_core_pytorch, resolve_dcn_backend  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "dcnv3_op"
HYPER_PARAMETERS = (
    "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w", "group",
    "group_channels", "offset_scale", "remove_center",
)
INSTALL_COMMAND = "pip install ./dcnv3_cuda --no-build-isolation"


def _load_module_from(path: Path, name: str, package_dir: Path | None = None) -> types.ModuleType:
    locations = [str(package_dir)] if package_dir is not None else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


build_utils = _load_module_from(ROOT / "dcnv3_cuda" / "build_utils.py", "dcnv3_cuda_build_utils")

try:
    import dcnv3_cuda as extension

    extension.dcnv3_cuda  # noqa: B018  (the repository's source folder imports as an empty namespace package)
except (ImportError, AttributeError):
    extension = None
    sys.modules.pop("dcnv3_cuda", None)

needs_extension = pytest.mark.skipif(extension is None, reason=f"dcnv3_cuda is not built ({INSTALL_COMMAND})")
needs_gpu = pytest.mark.skipif(
    extension is None or not torch.cuda.is_available(), reason="needs a CUDA device and the dcnv3_cuda extension"
)


# ---------------------------------------------------------------------------------------------- build environment


def _fake_toolkit(root: Path, release: str = "13.0") -> Path:
    """A directory that looks like a CUDA toolkit whose `nvcc` prints `release` and reports `TOP=` in dry runs."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime_api.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --dryrun) echo "#$ TOP={root}/bin/.." >&2 ;; '
        f'*) echo "Cuda compilation tools, release {release}, V{release}.1" ;; esac\n'
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return root


def test_cpu_only_torch_gets_one_clear_error():
    with pytest.raises(build_utils.BuildEnvironmentError, match="CPU-only build") as error:
        build_utils.require_cuda_torch("2.13.0+cpu", None)
    assert INSTALL_COMMAND in str(error.value)
    assert build_utils.require_cuda_torch("2.14.1+cu130", "13.0") == "13.0"


def test_prepare_build_environment_rejects_cpu_only_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    environ = {}
    with pytest.raises(build_utils.BuildEnvironmentError, match=r"torch\.version\.cuda is None"):
        build_utils.prepare_build_environment(environ)
    assert environ == {}


def test_toolkit_major_version_must_match_torch(tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "cuda-12.8", release="12.8")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(build_utils.BuildEnvironmentError, match=r"version 12\.8, but torch was built with CUDA 13\.0"):
        build_utils.prepare_build_environment({"CUDA_HOME": str(toolkit)})
    build_utils.check_toolkit_matches_torch("13.1", "13.0", toolkit)  # same major: accepted


def test_prepare_build_environment_exports_settings(tmp_path, monkeypatch):
    toolkit = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    environ = {"CUDA_HOME": str(toolkit), "TORCH_CUDA_ARCH_LIST": "9.0"}
    settings = build_utils.prepare_build_environment(environ)
    assert (settings.toolkit_version, settings.cuda_arch_list) == ("13.0", "9.0")
    assert environ == {"CUDA_HOME": str(toolkit), "TORCH_CUDA_ARCH_LIST": "9.0"}
    environ = {"CUDA_HOME": str(toolkit)}
    assert build_utils.prepare_build_environment(environ).cuda_arch_list == "8.0;8.6;8.9;9.0+PTX"
    assert environ["TORCH_CUDA_ARCH_LIST"] == "8.0;8.6;8.9;9.0+PTX"


def test_setup_py_stops_with_the_message_and_no_traceback():
    environ = {**os.environ, "CUDA_HOME": "/nonexistent-cuda"}
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT / "dcnv3_cuda", env=environ, capture_output=True, text=True
    )
    assert result.returncode == 1
    expected = "CUDA_HOME=/nonexistent-cuda is not a CUDA toolkit" if torch.version.cuda else "CPU-only build"
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_parse_nvcc_version():
    banner = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
    assert build_utils.parse_nvcc_version(banner) == "13.0"
    with pytest.raises(build_utils.BuildEnvironmentError, match="Could not read the CUDA version"):
        build_utils.parse_nvcc_version("command not found")


def test_find_cuda_home_order_and_errors(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    missing = tmp_path / "missing"
    assert build_utils.find_cuda_home({"CUDA_HOME": str(toolkit)}, lambda _: None, missing) == toolkit
    assert build_utils.find_cuda_home({}, lambda _: None, toolkit) == toolkit
    with pytest.raises(build_utils.BuildEnvironmentError, match=r"CUDA_HOME=.*is not a CUDA toolkit"):
        build_utils.find_cuda_home({"CUDA_HOME": str(missing)}, lambda _: None, toolkit)
    with pytest.raises(build_utils.BuildEnvironmentError, match="No CUDA toolkit found"):
        build_utils.find_cuda_home({}, lambda _: None, missing)


def test_find_cuda_home_sees_through_an_nvcc_wrapper_script(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = tmp_path / "local" / "bin" / "nvcc"  # like /usr/local/bin/nvcc: `exec <toolkit>/bin/nvcc "$@"`
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    found = build_utils.find_cuda_home({}, lambda _: str(wrapper), tmp_path / "missing")
    assert found == toolkit.resolve()


def test_find_cuda_library_includes_for_cu13_and_cu12_wheel_layouts(tmp_path):
    cu13, cu12 = tmp_path / "site13", tmp_path / "site12"
    (cu13 / "nvidia" / "cu13" / "include").mkdir(parents=True)
    for library in ("cusparse", "cublas"):
        (cu12 / "nvidia" / library / "include").mkdir(parents=True)
    (cu12 / "nvidia" / "cudnn" / "lib").mkdir(parents=True)
    found = build_utils.find_cuda_library_includes([cu13, cu12, cu13])
    assert found == (
        cu13 / "nvidia" / "cu13" / "include", cu12 / "nvidia" / "cublas" / "include",
        cu12 / "nvidia" / "cusparse" / "include",
    )


@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch has no nvidia-* header wheels")
def test_cuda_library_headers_are_found_in_this_environment():
    found = build_utils.find_cuda_library_includes(build_utils.site_package_dirs())
    assert any((folder / "cusparse.h").is_file() for folder in found), found


@pytest.mark.skipif(not Path("/usr/local/cuda/bin/nvcc").exists(), reason="no CUDA toolkit at /usr/local/cuda")
def test_real_toolkit_is_found_and_versioned():
    cuda_home = build_utils.find_cuda_home({})
    version = build_utils.toolkit_version(cuda_home)
    assert version.split(".")[0].isdigit() and (cuda_home / "include" / "cuda_runtime_api.h").is_file()


# ------------------------------------------------------------------------------------------------------- dispatch


def _op_case(device: str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 2) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(0)
    group, group_channels, points = 2, 4, 9
    input = torch.randn(batch, 5, 6, group * group_channels, generator=generator)
    offset = 2 * torch.randn(batch, 5, 6, group * points * 2, generator=generator)
    mask = torch.randn(batch, 5, 6, group, points, generator=generator).softmax(-1).flatten(-2)
    hyper = dict(
        kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1, dilation_w=1, group=group,
        group_channels=group_channels, offset_scale=1.0, remove_center=0,
    )
    return tuple(t.to(device, dtype) for t in (input, offset, mask)), hyper


def test_cuda_backend_without_the_extension_says_how_to_install(monkeypatch):
    monkeypatch.delenv(dcnv3_ops.BACKEND_ENV_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "dcnv3_cuda", None)  # makes `import dcnv3_cuda` raise ImportError
    with pytest.raises(RuntimeError, match=INSTALL_COMMAND):
        resolve_dcn_backend("cuda", torch.device("cuda"))
    tensors, hyper = _op_case()
    with pytest.raises(RuntimeError, match=INSTALL_COMMAND):
        dcnv3_core(*tensors, *hyper.values(), backend="cuda")
    monkeypatch.setenv(dcnv3_ops.BACKEND_ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match=INSTALL_COMMAND):
        dcnv3_core(*tensors, *hyper.values(), backend="pytorch")


def test_cuda_backend_with_the_extension_rejects_cpu_tensors(monkeypatch):
    monkeypatch.delenv(dcnv3_ops.BACKEND_ENV_VAR, raising=False)
    built = types.ModuleType("dcnv3_cuda")
    built.dcnv3_cuda = lambda *args: pytest.fail("the extension must not be called with CPU tensors")
    monkeypatch.setitem(sys.modules, "dcnv3_cuda", built)
    tensors, hyper = _op_case()
    with pytest.raises(RuntimeError, match="runs on CUDA tensors, got cpu tensors"):
        dcnv3_core(*tensors, *hyper.values(), backend="cuda")
    assert resolve_dcn_backend("auto", torch.device("cpu")) == "pytorch"


def test_source_folder_does_not_count_as_an_installed_extension(monkeypatch):
    if extension is not None:
        pytest.skip("an installed dcnv3_cuda shadows the source folder")
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.delitem(sys.modules, "dcnv3_cuda", raising=False)
    assert dcnv3_ops._cuda_extension_module() is None


def test_uncompiled_package_raises_an_import_error_with_the_install_command():
    package_dir = ROOT / "dcnv3_cuda" / "src" / "dcnv3_cuda"
    if any(package_dir.glob("_C*")):
        pytest.skip("the extension was built in place")
    with pytest.raises(ImportError, match=INSTALL_COMMAND):
        _load_module_from(package_dir / "__init__.py", "dcnv3_cuda_uncompiled", package_dir)


@needs_extension
def test_extension_rejects_cpu_tensors_with_a_clear_error():
    tensors, hyper = _op_case()
    with pytest.raises(RuntimeError, match="dcnv3_cuda runs on CUDA tensors, got input on cpu"):
        extension.dcnv3_cuda(*tensors, *hyper.values())


@needs_extension
def test_extension_registers_operators_with_fake_shapes():
    tensors, hyper = _op_case(device="meta")
    hyper.update(stride_h=2, pad_w=0)
    input, _, _ = tensors
    offset = torch.empty(2, 3, 4, 36, device="meta")
    mask = torch.empty(2, 3, 4, 18, device="meta")
    output = torch.ops.dcnv3_cuda.forward(input, offset, mask, *hyper.values())
    assert output.shape == (2, 3, 4, 8) and output.device.type == "meta"
    grads = torch.ops.dcnv3_cuda.backward(output, input, offset, mask, *hyper.values())
    assert [g.shape for g in grads] == [input.shape, offset.shape, mask.shape]


@needs_extension
def test_operators_trace_into_one_graph_with_their_backward():
    """torch.compile(fullgraph=True) through AOT autograd on meta tensors: the fake and autograd registrations."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(kind):
        def compiler(graph_module, example_inputs):
            graphs[kind] = graph_module.code
            return make_boxed_func(graph_module.forward)

        return compiler

    tensors, hyper = _op_case(device="meta")
    tensors = [t.requires_grad_(True) for t in tensors]

    def loss(input, offset, mask):
        return torch.ops.dcnv3_cuda.forward(input, offset, mask, *hyper.values()).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=aot_autograd(fw_compiler=keep("forward"),
                                                                        bw_compiler=keep("backward")))
    compiled(*tensors).backward()
    assert "dcnv3_cuda.forward.default" in graphs["forward"]
    assert "dcnv3_cuda.backward.default" in graphs["backward"]
    assert [t.grad.shape for t in tensors] == [t.shape for t in tensors]


# ------------------------------------------------------------------------------------- kernels emulated on the CPU

EMULATION_DIR = ROOT / "dcnv3_cuda" / "emulation"
KERNEL_SOURCE = ROOT / "dcnv3_cuda" / "csrc" / "dcnv3_cuda.cu"


@pytest.fixture(scope="module")
def host_emulation(tmp_path_factory) -> Path:
    """The kernels' device code compiled for the host (see dcnv3_cuda/emulation/host_emulation.cpp)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to compile the host emulation of the kernels")
    build = tmp_path_factory.mktemp("host_emulation")
    source = KERNEL_SOURCE.read_text()
    begin, end = source.index("// BEGIN DEVICE CODE"), source.index("// END DEVICE CODE")
    (build / "device_code.inc").write_text(source[begin:end])
    binary = build / "host_emulation"
    command = [compiler, "-std=c++20", "-O1", "-pthread", f"-I{build}", str(EMULATION_DIR / "host_emulation.cpp")]
    compiled = subprocess.run([*command, "-o", str(binary)], capture_output=True, text=True)
    if compiled.returncode != 0 and "barrier" in compiled.stderr:
        pytest.skip("this g++ has no C++20 <barrier>")
    assert compiled.returncode == 0, compiled.stderr
    return binary


def _emulate(binary: Path, case: dict, dtype: str, blocks: int, threads_per_block: int = 32) -> list[torch.Tensor]:
    """Output and gradients of the kernels run by the host emulation, as float64 tensors shaped like the inputs."""
    folder = binary.parent
    batch, height, width, _ = case["input"].shape
    _, height_out, width_out, _ = case["offset"].shape
    header = [batch, height, width, height_out, width_out] + [case[name] for name in HYPER_PARAMETERS[8:10]]
    header += [case[name] for name in HYPER_PARAMETERS[:8]] + [case["remove_center"], blocks, threads_per_block]
    arrays = [case[name].double().contiguous() for name in ("input", "offset", "mask", "grad_weight")]
    with open(folder / "in.bin", "wb") as stream:
        stream.write(struct.pack("18q", *header) + struct.pack("d", case["offset_scale"]))
        for array in arrays:
            stream.write(array.numpy().tobytes())
    subprocess.run([str(binary), str(folder / "in.bin"), str(folder / "out.bin"), dtype], check=True, timeout=300)
    flat = torch.from_file(str(folder / "out.bin"), size=sum(a.numel() for a in arrays), dtype=torch.float64)
    shapes = [arrays[3].shape, arrays[0].shape, arrays[1].shape, arrays[2].shape]
    return [part.view(shape) for part, shape in zip(flat.split([s.numel() for s in shapes]), shapes)]


@pytest.mark.parametrize("dtype", ["double", "float"])
def test_emulated_kernels_match_the_official_fixtures(host_emulation, dtype):
    output_atol, grad_atol = (1e-12, 1e-12) if dtype == "double" else (2e-5, 5e-5)
    for path in _fixture_cases():
        case = torch.load(path, weights_only=True)
        results = _emulate(host_emulation, case, dtype, blocks=3)
        for name, result in zip(("output", "grad_input", "grad_offset", "grad_mask"), results):
            atol = output_atol if name == "output" else grad_atol
            torch.testing.assert_close(result, case[f"{name}_f64ref"], atol=atol, rtol=0, msg=f"{path.stem} {name}")


@pytest.mark.parametrize(
    ("batch", "group", "group_channels", "kernel", "stride", "pad", "dilation", "offset_scale", "remove_center"),
    [(3, 3, 5, 3, 2, 1, 2, 0.5, 1), (1, 2, 48, 4, 1, 2, 1, 1.0, 0), (1, 1, 1, 5, 1, 2, 1, 2.0, 1),
     (2, 2, 33, 3, 1, 1, 1, 1.0, 0)],
)
def test_emulated_kernels_match_pytorch_beyond_the_fixtures(
    host_emulation, batch, group, group_channels, kernel, stride, pad, dilation, offset_scale, remove_center
):
    """group_channels that are not powers of two or exceed a warp, an even kernel, grid-stride loops."""
    generator = torch.Generator().manual_seed(group_channels)
    height, width, points = 7, 9, kernel * kernel - remove_center
    height_out = dcnv3_ops.dcnv3_output_size(height, kernel, stride, pad, dilation)
    width_out = dcnv3_ops.dcnv3_output_size(width, kernel, stride, pad, dilation)
    values = (kernel, kernel, stride, stride, pad, pad, dilation, dilation, group, group_channels, offset_scale,
              remove_center)
    case = dict(zip(HYPER_PARAMETERS, values))
    case["input"] = torch.randn(batch, height, width, group * group_channels, generator=generator, dtype=torch.float64)
    case["offset"] = 2 * torch.randn(batch, height_out, width_out, group * points * 2, generator=generator,
                                     dtype=torch.float64)
    case["mask"] = torch.rand(batch, height_out, width_out, group * points, generator=generator, dtype=torch.float64)
    case["grad_weight"] = torch.randn(batch, height_out, width_out, group * group_channels, generator=generator,
                                      dtype=torch.float64)
    expected = _run_with_grads(dcnv3_core_pytorch, *(case[name] for name in ("input", "offset", "mask")),
                               case["grad_weight"], values)
    results = _emulate(host_emulation, case, "double", blocks=2)
    for name, result, reference in zip(("output", "grad_input", "grad_offset", "grad_mask"), results, expected):
        torch.testing.assert_close(result, reference, atol=1e-12, rtol=0, msg=name)


@non_finite_cases(torch.float64, torch.float32)
def test_emulated_kernels_handle_non_finite_values_as_the_official_formulation(host_emulation, name, value, dtype):
    """NaN or ±inf in input, offsets or mask: the same non-finite outputs and gradients as the official grid_sample
    formulation (NaN for a NaN or infinite position, also far outside the image), and no pixel read by a point whose
    corners are all outside the image."""
    tensors, grad_weight = poisoned_case(name, value)
    case = {**dict(zip(HYPER_PARAMETERS, ARGUMENTS)), **tensors, "grad_weight": grad_weight}
    expected = forward_and_gradients(oracle_dcnv3_core, tensors, grad_weight, dtype)
    results = _emulate(host_emulation, case, "double" if dtype == torch.float64 else "float", blocks=2)
    assert_same_non_finite(results, expected, ATOL[dtype])


# ------------------------------------------------------------------------------------------------------------ GPU


def _fixture_cases() -> list[Path]:
    return sorted(FIXTURES.glob("case_*.pt"))


def _run_with_grads(function, input, offset, mask, grad_weight, hyper) -> list[torch.Tensor]:
    input, offset, mask = (t.detach().clone().requires_grad_(True) for t in (input, offset, mask))
    output = function(input, offset, mask, *hyper)
    (output * grad_weight).sum().backward()
    return [output.detach(), input.grad, offset.grad, mask.grad]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("path", _fixture_cases(), ids=lambda path: path.stem)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fixture_parity(path, dtype):
    case = torch.load(path, weights_only=True)
    hyper = [case[name] for name in HYPER_PARAMETERS]
    tensors = [case[name].to("cuda", dtype) for name in ("input", "offset", "mask", "grad_weight")]
    results = _run_with_grads(extension.dcnv3_cuda, *tensors, hyper)
    output_atol, grad_atol = (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 5e-5)
    for name, result in zip(("output", "grad_input", "grad_offset", "grad_mask"), results):
        atol = output_atol if name == "output" else grad_atol
        torch.testing.assert_close(result.double().cpu(), case[f"{name}_f64ref"], atol=atol, rtol=0, msg=name)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("path", _fixture_cases()[:6], ids=lambda path: path.stem)
def test_half_precision_parity_with_pytorch_on_the_same_inputs(path, dtype, tolerance):
    case = torch.load(path, weights_only=True)
    hyper = [case[name] for name in HYPER_PARAMETERS]
    low = [case[name].to("cuda", dtype) for name in ("input", "offset", "mask", "grad_weight")]
    results = _run_with_grads(extension.dcnv3_cuda, *low, hyper)
    expected = _run_with_grads(dcnv3_core_pytorch, *(t.float() for t in low), hyper)
    for name, result, reference in zip(("output", "grad_input", "grad_offset", "grad_mask"), results, expected):
        assert result.dtype == dtype
        torch.testing.assert_close(result.float(), reference, atol=tolerance, rtol=tolerance, msg=name)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("remove_center", [0, 1])
def test_gradcheck_float64(remove_center):
    generator = torch.Generator().manual_seed(1)
    group, group_channels, points = 3, 5, 9 - remove_center  # group_channels that is not a power of two
    input = torch.randn(2, 6, 5, group * group_channels, generator=generator, dtype=torch.float64)
    offset = 1.7 * torch.randn(2, 3, 3, group * points * 2, generator=generator, dtype=torch.float64)
    mask = torch.rand(2, 3, 3, group * points, generator=generator, dtype=torch.float64)
    inputs = tuple(t.cuda().requires_grad_(True) for t in (input, offset, mask))

    def operator(input, offset, mask):
        return extension.dcnv3_cuda(input, offset, mask, 3, 3, 2, 2, 1, 1, 2, 1, group, group_channels, 0.5,
                                    remove_center)

    # grad_input is summed with atomics, so two backward passes may differ in the last bits.
    assert torch.autograd.gradcheck(operator, inputs, eps=1e-6, atol=1e-7, nondet_tol=1e-12)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("group_channels", [1, 16, 48, 64])
def test_batch_300_and_group_channels_match_pytorch(group_channels):
    generator = torch.Generator().manual_seed(2)
    batch, group, points = 300, 2, 9
    input = torch.randn(batch, 7, 9, group * group_channels, generator=generator)
    offset = 3 * torch.randn(batch, 7, 9, group * points * 2, generator=generator)
    mask = torch.randn(batch, 7, 9, group, points, generator=generator).softmax(-1).flatten(-2)
    grad_weight = torch.randn(batch, 7, 9, group * group_channels, generator=generator)
    hyper = [3, 3, 1, 1, 1, 1, 1, 1, group, group_channels, 1.0, 0]
    tensors = [t.cuda() for t in (input, offset, mask, grad_weight)]
    results = _run_with_grads(extension.dcnv3_cuda, *tensors, hyper)
    expected = _run_with_grads(dcnv3_core_pytorch, *(t.double() for t in tensors), hyper)
    for name, result, reference in zip(("output", "grad_input", "grad_offset", "grad_mask"), results, expected):
        torch.testing.assert_close(result.double(), reference, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.gpu
@needs_gpu
@non_finite_cases(torch.float32, torch.float64)
def test_non_finite_values_match_the_official_formulation(name, value, dtype):
    check_against_the_official_formulation(extension.dcnv3_cuda, name, value, dtype, device="cuda")


@pytest.mark.gpu
@needs_gpu
def test_backward_refuses_deterministic_mode():
    tensors, hyper = _op_case(device="cuda")
    input = tensors[0].requires_grad_(True)
    output = extension.dcnv3_cuda(input, *tensors[1:], *hyper.values())
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="dcnv3_cuda::backward does not have a deterministic implementation"):
            output.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
@needs_gpu
def test_opcheck_schema_fake_and_autograd_registrations():
    tensors, hyper = _op_case(device="cuda")
    tensors = tuple(t.requires_grad_(True) for t in tensors)
    torch.library.opcheck(torch.ops.dcnv3_cuda.forward.default, (*tensors, *hyper.values()))


@pytest.mark.gpu
@needs_gpu
def test_torch_compile_has_no_graph_break():
    tensors, hyper = _op_case(device="cuda")

    def loss(input, offset, mask):
        return (extension.dcnv3_cuda(input, offset, mask, *hyper.values()) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager_inputs = [t.clone().requires_grad_(True) for t in tensors]
    compiled_inputs = [t.clone().requires_grad_(True) for t in tensors]
    eager_loss, compiled_loss = loss(*eager_inputs), compiled(*compiled_inputs)
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for eager, compiled_input in zip(eager_inputs, compiled_inputs):
        torch.testing.assert_close(compiled_input.grad, eager.grad)


@pytest.mark.gpu
@needs_gpu
def test_whole_model_parity_across_backends(monkeypatch):
    """InternImageForImageClassification gives the same logits and parameter gradients on every backend."""
    from configuration_internimage import InternImageConfig
    from modeling_internimage import InternImageDCNv3, InternImageForImageClassification

    config = InternImageConfig(channels=16, depths=[1, 1, 2, 1], groups=[2, 4, 8, 16], num_labels=10)
    torch.manual_seed(0)
    model = InternImageForImageClassification(config).cuda().eval()
    with torch.no_grad():  # non-zero offsets, so the sampling is really deformable
        for module in model.modules():
            if isinstance(module, InternImageDCNv3):
                module.offset.weight.normal_(0, 0.5)
                module.offset.bias.normal_(0, 1.0)
    pixel_values = torch.randn(2, 3, 64, 96, device="cuda")
    backends = ["cuda", "pytorch"] + (["triton"] if dcnv3_ops.triton_is_available() else [])
    logits, gradients = {}, {}
    for backend in backends:
        monkeypatch.setenv(dcnv3_ops.BACKEND_ENV_VAR, backend)
        model.zero_grad()
        logits[backend] = model(pixel_values).logits
        logits[backend].square().sum().backward()
        gradients[backend] = {name: param.grad.clone() for name, param in model.named_parameters()}
    for backend in backends[1:]:
        torch.testing.assert_close(logits[backend], logits["cuda"], atol=1e-4, rtol=1e-4, msg=backend)
        for name, gradient in gradients["cuda"].items():
            torch.testing.assert_close(gradients[backend][name], gradient, atol=1e-3, rtol=1e-3, msg=name)


@pytest.mark.gpu
@needs_gpu
def test_flat_indices_beyond_int32():
    """An input of more than 2**31 elements: the last image rows are read and written at 64-bit offsets."""
    height, width, channels, rows = 2048, 1024, 1040, 4
    input = torch.zeros(1, height, width, channels, device="cuda", dtype=torch.float16)
    assert input.numel() > 2**31
    input[:, -rows:].normal_()
    offset = torch.zeros(1, height, width, 18, device="cuda", dtype=torch.float16)
    mask = torch.full((1, height, width, 9), 1 / 9, device="cuda", dtype=torch.float16)
    hyper = [3, 3, 1, 1, 1, 1, 1, 1, 1, channels, 1.0, 0]
    output = extension.dcnv3_cuda(input, offset, mask, *hyper)[:, -rows + 1:]
    expected = dcnv3_core_pytorch(
        input[:, -rows:].float(), offset[:, -rows:].float(), mask[:, -rows:].float(), *hyper
    )[:, 1:]
    torch.testing.assert_close(output.float(), expected, atol=2e-3, rtol=2e-3)
