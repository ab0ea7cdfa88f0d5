"""NaN and ±inf cases for the DCNv3 backends, with the official grid_sample formulation (`dcnv3_oracle`) as the
reference for which outputs and gradients are non-finite.

The case has offsets of a few pixels (many points near or beyond the border) and sends every point of the first
output pixel far to the top-left of the image, where it reads no pixel: the first entry poisoned in the input is
pixel (0, 0), which such points must not read, and the first entry poisoned in the mask belongs to such a point.
"""

from __future__ import annotations

import pytest
import torch
from dcnv3_oracle import oracle_dcnv3_core

NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
TENSORS = ("input", "offset", "mask")
# kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels, offset_scale,
# remove_center
ARGUMENTS = (3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 0)
ATOL = {torch.float32: 5e-5, torch.float64: 1e-10}


def non_finite_cases(*dtypes: torch.dtype) -> pytest.MarkDecorator:
    """Parametrises a test over (name, value, dtype): NaN, inf and -inf in each of the three tensors, per dtype."""
    cases = [
        pytest.param(name, value, dtype, id=f"{name}-{key}-{str(dtype).removeprefix('torch.')}")
        for dtype in dtypes
        for name in TENSORS
        for key, value in NON_FINITE.items()
    ]
    return pytest.mark.parametrize("name, value, dtype", cases)


def poisoned_case(name: str, value: float, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """float64 (input, offset, mask) of a 4x5 image with `value` at four scattered entries of `name`, and a random
    weight of the outputs for the gradients (the loss is `sum(output * weight)`). Tiny for the Triton interpreter."""
    generator = torch.Generator().manual_seed(seed)
    batch, height, width, group, channels, points = 1, 4, 5, ARGUMENTS[8], ARGUMENTS[8] * ARGUMENTS[9], 9
    tensors = {
        "input": torch.randn(batch, height, width, channels, generator=generator, dtype=torch.float64),
        "offset": 3 * torch.randn(batch, height, width, group * points * 2, generator=generator, dtype=torch.float64),
        "mask": torch.randn(batch, height, width, group, points, generator=generator, dtype=torch.float64)
        .softmax(-1)
        .flatten(-2),
    }
    tensors["offset"][0, 0, 0] = -100.0
    flat = tensors[name].view(-1)
    flat[[0, 5, flat.numel() // 3, flat.numel() - 1]] = value
    grad_weight = torch.randn(batch, height, width, channels, generator=generator, dtype=torch.float64)
    return tensors, grad_weight


def forward_and_gradients(
    op, tensors: dict[str, torch.Tensor], grad_weight: torch.Tensor, dtype: torch.dtype, device: str = "cpu"
) -> list[torch.Tensor]:
    """[output, grad_input, grad_offset, grad_mask] of `op` in `dtype`, as float64 on the CPU."""
    leaves = [tensors[name].to(device, dtype, copy=True).requires_grad_() for name in TENSORS]
    output = op(*leaves, *ARGUMENTS)
    gradients = torch.autograd.grad((output * grad_weight.to(device, dtype)).sum(), leaves)
    return [result.detach().double().cpu() for result in (output, *gradients)]


def assert_same_non_finite(actual: list[torch.Tensor], expected: list[torch.Tensor], atol: float) -> None:
    """Output and gradients: the same entries are non-finite (and some outputs are), the finite ones agree."""
    assert 0 < int(torch.isfinite(expected[0]).logical_not().sum()) < expected[0].numel() // 2
    for what, got, want in zip(("output", "grad_input", "grad_offset", "grad_mask"), actual, expected):
        finite = torch.isfinite(want)
        torch.testing.assert_close(torch.isfinite(got), finite, rtol=0, atol=0, msg=f"{what}: non-finite entries")
        torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=atol, msg=what)


def check_against_the_official_formulation(
    op, name: str, value: float, dtype: torch.dtype, device: str = "cpu"
) -> list[torch.Tensor]:
    """Run `op` on the poisoned case and compare it with the oracle in `dtype`; returns op's results."""
    tensors, grad_weight = poisoned_case(name, value)
    actual = forward_and_gradients(op, tensors, grad_weight, dtype, device)
    expected = forward_and_gradients(oracle_dcnv3_core, tensors, grad_weight, dtype)
    assert_same_non_finite(actual, expected, ATOL[dtype])
    if name == "offset" or value != value:  # a non-finite position, or a NaN anywhere, gives NaN (not ±inf)
        assert actual[0][~torch.isfinite(actual[0])].isnan().all()
    return actual
