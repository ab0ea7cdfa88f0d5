"""The PyTorch DCNv3 core (`dcnv3_pytorch.py`, the CPU default) and the clean-room oracle it is measured against.

Both are checked against the official fixtures (outputs and the three gradients), against each other on random
cases covering every hyper-parameter, with gradcheck in float64, in half precision, under torch.compile, and inside
the DCNv3 module (our forward vs the official module forward).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dcnv3_non_finite import check_against_the_official_formulation, non_finite_cases  # noqa: E402
from dcnv3_oracle import (  # noqa: E402
    GRADIENTS,
    HYPER_PARAMETERS,
    oracle_dcnv3_core,
    oracle_dcnv3_module_forward,
    random_case,
    run_op,
)

import dcnv3_pytorch  # noqa: E402
from configuration_internimage import InternImageConfig  # noqa: E402
from dcnv3_custom_ops import checked_spec  # noqa: E402
from dcnv3_ops import dcnv3_core, dcnv3_core_pytorch  # noqa: E402
from modeling_internimage import InternImageDCNv3  # noqa: E402

FIXTURES = sorted((ROOT / "tests" / "fixtures" / "dcnv3_op").glob("case_*.pt"))


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """`INTERNIMAGE_DCN_BACKEND` would override `backend="pytorch"`."""
    monkeypatch.delenv("INTERNIMAGE_DCN_BACKEND", raising=False)


def pytorch_backend(*args) -> torch.Tensor:
    return dcnv3_core(*args, backend="pytorch")


@pytest.mark.parametrize("path", FIXTURES, ids=lambda path: path.stem)
@pytest.mark.parametrize("op", [pytorch_backend, oracle_dcnv3_core], ids=["pytorch", "oracle"])
def test_official_fixtures(path, op):
    case = torch.load(path, weights_only=True)
    args = tuple(case[name] for name in HYPER_PARAMETERS)
    inputs = {name: case[name] for name in GRADIENTS}
    output, grads = run_op(op, inputs, args, case["grad_weight"], torch.float64)
    torch.testing.assert_close(output, case["output_f64ref"], rtol=0, atol=1e-8)
    for name in GRADIENTS:
        torch.testing.assert_close(grads[name], case[f"grad_{name}_f64ref"], rtol=0, atol=1e-8)

    output, grads = run_op(op, inputs, args, case["grad_weight"], torch.float32)
    torch.testing.assert_close(output, case["output"].float(), rtol=0, atol=2e-5)
    for name in GRADIENTS:
        torch.testing.assert_close(grads[name], case[f"grad_{name}"].float(), rtol=0, atol=5e-5)


RANDOM_CASES = {
    "default": {},
    "kernel5_pad2": {"kernel": 5, "pad": 2},
    "kernel5_pad0_remove_center": {"kernel": 5, "pad": 0, "remove_center": 1},
    "remove_center": {"remove_center": 1},
    "stride2": {"stride": 2},
    "stride2_pad0": {"stride": 2, "pad": 0, "height": 8},
    "dilation2": {"dilation": 2, "pad": 2},
    "dilation2_stride2_remove_center": {"dilation": 2, "stride": 2, "remove_center": 1},
    "offset_scale2": {"offset_scale": 2.0},
    "offset_scale0.5": {"offset_scale": 0.5, "group": 3},
    "group1": {"group": 1, "group_channels": 8},
    "group4": {"group": 4, "group_channels": 2},
    "group_channels3": {"group_channels": 3},
    "group_channels12": {"group": 3, "group_channels": 12},
    "batch1": {"batch": 1},
    "batch3_tall": {"batch": 3, "height": 11, "width": 4},
    "one_pixel": {"height": 1, "width": 1},
    "far_outside": {"offset_std": 40.0},
}


@pytest.mark.parametrize("options", RANDOM_CASES.values(), ids=RANDOM_CASES.keys())
def test_matches_oracle_on_random_cases(options):
    inputs, args, grad_weight = random_case(**options)
    output, grads = run_op(dcnv3_core_pytorch, inputs, args, grad_weight, torch.float64)
    expected_output, expected_grads = run_op(oracle_dcnv3_core, inputs, args, grad_weight, torch.float64)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-10)
    for name in GRADIENTS:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=1e-10)
    assert output.abs().max() > 0.01  # the case samples the image


def test_positions_outside_the_image_read_zero():
    inputs, args, grad_weight = random_case()
    offset = inputs["offset"].view(*inputs["offset"].shape[:-1], -1, 2)
    offset[..., 0] = 1e6  # every point far to the right of the image
    offset[::2, ..., 0] = -1e6  # and far to the left in every other image
    output, grads = run_op(dcnv3_core_pytorch, inputs, args, grad_weight, torch.float64)
    assert torch.count_nonzero(output) == 0
    for name in GRADIENTS:
        assert torch.count_nonzero(grads[name]) == 0


def test_bilinear_weights_on_a_ramp():
    """On the image x + 10 y, a single point with mask 1 and offset (dx, dy) reads exactly x + dx + 10 (y + dy)."""
    height, width = 5, 6
    ramp = (torch.arange(width) + 10 * torch.arange(height)[:, None]).to(torch.float64).view(1, height, width, 1)
    offset = torch.zeros(1, height, width, 9, 2, dtype=torch.float64)
    offset[..., 4, :] = torch.tensor([0.25, 0.5], dtype=torch.float64)  # the centre tap
    mask = torch.zeros(1, height, width, 9, dtype=torch.float64)
    mask[..., 4] = 1
    output = dcnv3_core_pytorch(ramp, offset.flatten(-2), mask, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1.0, 0)
    expected = ramp + 0.25 + 10 * 0.5
    interior = (slice(None), slice(0, height - 1), slice(0, width - 1))  # the last row/column blend with zeros
    torch.testing.assert_close(output[interior], expected[interior], rtol=0, atol=1e-12)


GRADCHECK_CASES = {
    "default": {},
    "remove_center": {"remove_center": 1},
    "stride2": {"stride": 2, "pad": 0},
    "dilation2": {"dilation": 2, "pad": 2},
    "kernel5": {"kernel": 5, "pad": 2, "group": 1},
    "offset_scale2_group3": {"offset_scale": 2.0, "group": 3, "group_channels": 3},
}


@pytest.mark.parametrize("options", GRADCHECK_CASES.values(), ids=GRADCHECK_CASES.keys())
def test_gradcheck(options):
    inputs, args, _ = random_case(**{"batch": 1, "height": 4, "width": 5, "group_channels": 2, **options})
    leaves = [inputs[name].requires_grad_() for name in GRADIENTS]
    assert torch.autograd.gradcheck(
        lambda *tensors: dcnv3_core_pytorch(*tensors, *args), leaves, eps=1e-6, atol=1e-6, fast_mode=True
    )


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 3e-3), (torch.bfloat16, 2.5e-2)])
def test_half_precision_against_float64(dtype, atol):
    inputs, args, grad_weight = random_case(batch=2, height=9, width=8, group_channels=8)
    rounded = {name: tensor.to(dtype).double() for name, tensor in inputs.items()}  # identical inputs for both
    output, grads = run_op(dcnv3_core_pytorch, rounded, args, grad_weight, dtype)
    expected_output, expected_grads = run_op(dcnv3_core_pytorch, rounded, args, grad_weight, torch.float64)
    assert output.dtype == dtype and all(grad.dtype == dtype for grad in grads.values())
    torch.testing.assert_close(output.double(), expected_output, rtol=0, atol=atol)
    torch.testing.assert_close(grads["input"].double(), expected_grads["input"], rtol=0, atol=atol)
    torch.testing.assert_close(grads["offset"].double(), expected_grads["offset"], rtol=0, atol=2 * atol)
    torch.testing.assert_close(grads["mask"].double(), expected_grads["mask"], rtol=0, atol=4 * atol)  # |grad| ~ 10


def test_torch_compile_fullgraph_matches_eager():
    inputs, args, grad_weight = random_case(batch=2, height=12, width=10, group=4, group_channels=8, seed=1)
    compiled = torch.compile(dcnv3_core_pytorch, fullgraph=True)
    output, grads = run_op(compiled, inputs, args, grad_weight, torch.float32)
    expected_output, expected_grads = run_op(dcnv3_core_pytorch, inputs, args, grad_weight, torch.float32)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-5)
    for name in GRADIENTS:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("center_feature_scale", [False, True], ids=["plain", "center_feature_scale"])
def test_module_forward_matches_official_structure(center_feature_scale):
    """`InternImageDCNv3.forward` equals the official module forward around the oracle op (float64)."""
    config = InternImageConfig(
        channels=12, groups=[3], depths=[1], center_feature_scale=center_feature_scale, dw_kernel_size=5,
        offset_scale=2.0, dcn_backend="pytorch",
    )
    torch.manual_seed(0)
    module = InternImageDCNv3(config, channels=12, groups=3).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.5)
    hidden_states = torch.randn(2, 6, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(
        module(hidden_states), oracle_dcnv3_module_forward(module, hidden_states), rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_corner_products_sampled_and_gathered_agree(dtype):
    """The backward's dot products of the output gradient with the corner rows: `sampled_addmm` (CPU float32 and
    float64) and the gather (other devices) give the same numbers."""
    inputs, args, _ = random_case(batch=2, height=7, width=9, seed=3)
    input, offset, mask = (inputs[name].to(dtype) for name in GRADIENTS)
    spec = checked_spec(input, offset, mask, *args)
    sampling = dcnv3_pytorch._bilinear_sampling(input, offset, mask, spec)
    table = dcnv3_pytorch._zero_bordered_table(input, spec.group_channels)
    grad_output = torch.randn(sampling.rows.shape[0], args[9], dtype=dtype, generator=torch.Generator().manual_seed(4))
    rows = sampling.rows.long().unsqueeze(-1) + torch.tensor(sampling.corner_shifts)
    expected = (table[rows] * grad_output[:, None, None, :]).sum(-1)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    for products in (dcnv3_pytorch._sampled_corner_products, dcnv3_pytorch._gathered_corner_products):
        torch.testing.assert_close(torch.stack(products(sampling, table, grad_output), -1), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse_products", "embedding_bag"])
def test_chunks_of_images_change_nothing(monkeypatch, sparse):
    """On CPU the backward runs in chunks of images (about `_CPU_CHUNK_POINTS` sampling points each): the gradients
    are those of one pass over the whole batch, with a partial last chunk, whichever way the bags are summed (sparse
    products on CPU, `embedding_bag` on other devices)."""
    monkeypatch.setattr(dcnv3_pytorch, "_sparse_products", lambda table: sparse)
    inputs, args, grad_weight = random_case(batch=5, height=6, width=7, seed=5)
    expected_output, expected_grads = run_op(dcnv3_core_pytorch, inputs, args, grad_weight, torch.float64)
    monkeypatch.setattr(dcnv3_pytorch, "_CPU_CHUNK_POINTS", 2 * 6 * 7 * 2 * 9)  # two of the five images per chunk
    assert len(dcnv3_pytorch._image_chunks(inputs["mask"])) == 3
    output, grads = run_op(dcnv3_core_pytorch, inputs, args, grad_weight, torch.float64)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-12)
    for name in GRADIENTS:  # the table gradient sums in another order
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=1e-12)
    oracle_output, oracle_grads = run_op(oracle_dcnv3_core, inputs, args, grad_weight, torch.float64)
    torch.testing.assert_close(output, oracle_output, rtol=0, atol=1e-10)
    for name in GRADIENTS:
        torch.testing.assert_close(grads[name], oracle_grads[name], rtol=0, atol=1e-10)


@non_finite_cases(torch.float32, torch.float64)
def test_non_finite_values_match_the_official_formulation(name, value, dtype):
    """NaN or ±inf in the input, offsets or mask never raise (a NaN offset used to index the table at -2**31) and
    make the same outputs and gradients non-finite as the official grid_sample formulation: a NaN or infinite
    sampling position gives NaN, a non-finite mask or pixel value the non-finite products it takes part in. Points
    far outside the image read no pixel, so a NaN pixel does not reach them."""
    check_against_the_official_formulation(dcnv3_core_pytorch, name, value, dtype)
