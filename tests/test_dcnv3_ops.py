"""The DCNv3 dispatch (`dcnv3_ops.py`) and what the backends share (`dcnv3_custom_ops.py`): one documented import,
one check of a call before every backend, the custom operators registered once, `dcnv3_core` under torch.compile.
The backends' own tests: `test_dcnv3_pytorch.py`, `test_dcnv3_triton.py`, `test_dcnv3_cuda.py`."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dcnv3_oracle import GRADIENTS, HYPER_PARAMETERS, oracle_dcnv3_core, random_case, run_op  # noqa: E402

import dcnv3_pytorch  # noqa: E402
from dcnv3_ops import BACKENDS, dcnv3_core, dcnv3_core_pytorch  # noqa: E402
from dcnv3_triton import dcnv3_triton  # noqa: E402


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """`INTERNIMAGE_DCN_BACKEND` would override the `backend` argument."""
    monkeypatch.delenv("INTERNIMAGE_DCN_BACKEND", raising=False)


def test_rejects_inconsistent_shapes():
    inputs, args, _ = random_case()
    with pytest.raises(ValueError, match="group \\* group_channels"):
        dcnv3_core_pytorch(inputs["input"][..., :-1], inputs["offset"], inputs["mask"], *args)
    with pytest.raises(ValueError, match="group \\* points"):
        dcnv3_core_pytorch(inputs["input"], inputs["offset"], inputs["mask"][..., :-1], *args)


ENTRY_POINTS = {
    **{f"dcnv3_core[{backend}]": functools.partial(dcnv3_core, backend=backend) for backend in BACKENDS},
    "dcnv3_core_pytorch": dcnv3_core_pytorch,
    "dcnv3_triton": dcnv3_triton,
}


@pytest.mark.parametrize("entry", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
def test_every_backend_rejects_a_bad_call_with_the_same_error(entry):
    """One check (`checked_spec`) runs before any backend, installed or not, and says what does not fit."""
    inputs, args, _ = random_case(group=2, group_channels=4)
    input, offset, mask = inputs["input"], inputs["offset"], inputs["mask"]
    with_argument = {name: index for index, name in enumerate(HYPER_PARAMETERS)}

    def changed(name: str, value) -> tuple:
        return (*args[: with_argument[name]], value, *args[with_argument[name] + 1 :])

    bad_calls = [
        ((input[..., :-1], offset, mask), args, r"floating \(N, H, W, group \* group_channels = 8\) tensor, got"),
        ((input.long(), offset, mask), args, "floating .* got torch.int64"),
        ((input, offset[..., :-2], mask), args, r"offset must have shape \(2, 7, 9, 36\) .*group \* points \* 2"),
        ((input, offset, mask[:, :-1]), args, r"mask must have shape \(2, 7, 9, 18\) .*group \* points\)"),
        ((input, offset, mask), changed("stride_h", 0), "`stride_h` must be at least 1, got 0"),
        ((input, offset, mask), changed("pad_w", -1), "`pad_w` must be at least 0, got -1"),
        ((input, offset, mask), changed("remove_center", 2), "`remove_center` is 0 or 1, got 2"),
        ((input, offset.to("meta"), mask), args, "offset is on meta but input is on cpu"),
    ]
    for tensors, arguments, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            entry(*tensors, *arguments)


def test_torch_compile_of_the_dispatch_matches_eager():
    """`dcnv3_core` (backend resolution included) compiles in one graph, with and without gradients."""
    inputs, args, grad_weight = random_case(batch=2, height=6, width=9, group=3, group_channels=4, seed=2)
    compiled = torch.compile(lambda *tensors: dcnv3_core(*tensors, backend="pytorch"), fullgraph=True)
    expected_output, expected_grads = run_op(dcnv3_core_pytorch, inputs, args, grad_weight, torch.float32)
    with torch.no_grad():
        output = compiled(*(inputs[name].float() for name in GRADIENTS), *args)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-5)
    output, grads = run_op(compiled, inputs, args, grad_weight, torch.float32)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-5)
    for name in GRADIENTS:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=1e-5)


def test_the_documented_import_and_the_old_names_are_the_same_op():
    """README imports the op from `modeling_internimage` (also in a converted folder); `dcnv3_ops` keeps its names."""
    import dcnv3_ops
    import modeling_internimage

    for name in ("dcnv3_core", "dcnv3_core_pytorch", "resolve_dcn_backend"):
        assert getattr(modeling_internimage, name) is getattr(dcnv3_ops, name), name
    assert dcnv3_ops.dcnv3_core_pytorch is dcnv3_pytorch.dcnv3_core_pytorch
    assert dcnv3_ops.dcnv3_output_size(56, 3, 1, 1, 1) == 56


def test_operators_are_registered_once_per_process(monkeypatch):
    """Loading the op files again under other names (as remote code does) must not register the custom operators
    again: that invalidates the handles the first copy holds (the converter's reload check crashed on it)."""
    registered = []
    register = torch.library.custom_op

    def recording_register(name, *args, **kwargs):
        registered.append(name)
        return register(name, *args, **kwargs)

    monkeypatch.setattr(torch.library, "custom_op", recording_register)
    for name in ("dcnv3_pytorch", "dcnv3_triton"):
        spec = importlib.util.spec_from_file_location(f"second_copy_of_{name}", ROOT / f"{name}.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert registered == []
    inputs, args, grad_weight = random_case()
    output, grads = run_op(dcnv3_core_pytorch, inputs, args, grad_weight, torch.float64)
    expected_output, expected_grads = run_op(oracle_dcnv3_core, inputs, args, grad_weight, torch.float64)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-10)
    for name in GRADIENTS:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=1e-10)
