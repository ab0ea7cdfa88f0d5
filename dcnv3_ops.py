"""DCNv3 core operator: the PyTorch implementation and the backend dispatch.

Layouts follow the official op: `input` is (N, H, W, G*Cg) channels-last, `offset` is (N, H_out, W_out, G*P*2)
with (dx, dy) pairs in pixels, `mask` is (N, H_out, W_out, G*P) already normalised over the P points of each
group, and the output is (N, H_out, W_out, G*Cg). P = kernel_h * kernel_w - remove_center, with the sampling
points ordered x-outer, y-inner. The sampling position of point p for output pixel (i, j) is
`(c - pad + i * stride + offset_scale * (tap_p * dilation + offset_p))` per axis, `c = dilation * (k - 1) // 2`,
and values outside the image are zero (bilinear interpolation).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
import torch.nn.functional as F
from transformers.utils import logging

try:
    from .dcnv3_triton import dcnv3_triton
    from .dcnv3_triton import is_available as triton_is_available
except ImportError:
    from dcnv3_triton import dcnv3_triton
    from dcnv3_triton import is_available as triton_is_available

logger = logging.get_logger(__name__)

BACKEND_ENV_VAR = "INTERNIMAGE_DCN_BACKEND"
BACKENDS = ("auto", "triton", "cuda", "pytorch")


def dcnv3_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Spatial output size of the DCNv3 core along one axis."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _kernel_taps(kernel: int, dilation: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Offsets of the kernel taps along one axis, in pixels: `-((d * (k - 1)) // 2) + d * t` (as the official op)."""
    return -((dilation * (kernel - 1)) // 2) + dilation * torch.arange(kernel, device=device, dtype=dtype)


def _sampling_positions(
    offset: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    offset_scale: float,
    remove_center: int,
    dtype: torch.dtype,
    shift: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling positions x and y in un-padded input pixels plus `shift`, each (N, H_out, W_out, G, P), in `dtype`."""
    batch, height_out, width_out, _ = offset.shape
    device = offset.device
    tap_x = _kernel_taps(kernel_w, dilation_w, device, dtype).repeat_interleave(kernel_h)
    tap_y = _kernel_taps(kernel_h, dilation_h, device, dtype).repeat(kernel_w)
    if remove_center:
        keep = torch.arange(kernel_h * kernel_w, device=device) != (kernel_h * kernel_w - 1) // 2
        tap_x, tap_y = tap_x[keep], tap_y[keep]
    num_points = tap_x.numel()
    start_x = (dilation_w * (kernel_w - 1)) // 2 - pad_w + shift
    start_y = (dilation_h * (kernel_h - 1)) // 2 - pad_h + shift
    # Regular grid (H_out, W_out, 1, P) per axis: output pixel origin plus the scaled kernel tap.
    grid_x = start_x + stride_w * torch.arange(width_out, device=device, dtype=dtype).view(1, -1, 1, 1)
    grid_y = start_y + stride_h * torch.arange(height_out, device=device, dtype=dtype).view(-1, 1, 1, 1)
    offset = offset.view(batch, height_out, width_out, group, num_points, 2)
    x = torch.add(grid_x + offset_scale * tap_x, offset[..., 0], alpha=offset_scale)
    y = torch.add(grid_y + offset_scale * tap_y, offset[..., 1], alpha=offset_scale)
    return x.to(dtype), y.to(dtype)


def dcnv3_core_pytorch(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: int | bool,
) -> torch.Tensor:
    """DCNv3 core in plain PyTorch, differentiable, on any device and floating dtype.

    Each output is the mask- and bilinear-weighted sum of the 4 * P corner rows of its group, gathered by four
    `F.embedding_bag` calls (one per corner, no (N, H_out, W_out, G, P, Cg) intermediate) from a zero-bordered copy
    of the input. Positions are computed in float64 for float64 inputs and in float32 otherwise.
    """
    batch, height, width, channels = input.shape
    if channels != group * group_channels:
        raise ValueError(f"input has {channels} channels, expected group * group_channels = {group * group_channels}")
    position_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    # Positions in the table's coordinates (one border pixel on the top and left).
    x, y = _sampling_positions(
        offset, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
        offset_scale, int(remove_center), position_dtype, shift=1.0,
    )
    _, height_out, width_out, _, num_points = x.shape
    if mask.shape[-1] != group * num_points:
        raise ValueError(f"mask has {mask.shape[-1]} channels, expected group * points = {group * num_points}")

    # Zero-bordered table (N * G * table_h * table_w, Cg): pixel (y, x) of group g in image n is row
    # ((n * G + g) * table_h + y + 1) * table_w + x + 1. Clamping the positions to [0, size + 1] keeps all four
    # bilinear corners inside the table (a position outside the image only weights the zero border), and makes
    # the integer conversion a floor.
    table_h, table_w = height + 3, width + 3
    table = F.pad(input.view(batch, height, width, group, group_channels).permute(0, 3, 1, 2, 4), (0, 0, 1, 2, 1, 2))
    table = table.reshape(-1, group_channels)
    index_dtype = torch.int32 if table.shape[0] < 2**31 else torch.int64
    x, y = x.clamp(0, width + 1), y.clamp(0, height + 1)
    image_group = torch.arange(batch * group, device=input.device, dtype=index_dtype) * (table_h * table_w)
    image_group = image_group.view(batch, 1, 1, group, 1).expand(batch, 1, 1, group, num_points)
    # Pixel index in floating point (exact below 2**24 in float32), one integer conversion: compiled, this keeps the
    # fused index kernel vectorised.
    pixel_dtype = x.dtype if table_h * table_w <= 2**24 else torch.float64
    pixel = torch.add(x.trunc().to(pixel_dtype), y.trunc().to(pixel_dtype), alpha=table_w)
    rows = pixel.to(index_dtype).add_(image_group).view(-1, num_points)

    mask = mask.view(batch, height_out, width_out, group, num_points).to(position_dtype)
    frac_x = torch.frac(x)
    bottom = mask * torch.frac(y)
    top = mask - bottom
    top_right, bottom_right = top * frac_x, bottom * frac_x
    corner_weights = (top - top_right, top_right, bottom - bottom_right, bottom_right)
    corner_weights = [weight.to(input.dtype).view(-1, num_points) for weight in corner_weights]
    output = _BilinearCornerSum.apply(table, rows, table_w, *corner_weights)
    return output.view(batch, height_out, width_out, channels)


class _BilinearCornerSum(torch.autograd.Function):
    """`sum_c embedding_bag(rows, table[shift_c:], weights_c)` over the four bilinear corners c, whose rows are
    `rows + shift_c` with shifts (0, 1, table_w, table_w + 1).

    Forward: four `F.embedding_bag` calls. Backward, several times faster on CPU than `embedding_bag`'s own: the
    (row, bag) pairs are sorted by row once, so the table gradient of each corner is one `embedding_bag` over the
    output gradient; the weight gradients are dot products with rows gathered once from a 2x2-neighbourhood table.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor, table_w: int, *weights: torch.Tensor) -> torch.Tensor:
        """table (R, Cg), rows (B, K) int, weights 4 x (B, K) -> (B, Cg)."""
        shifts = (0, 1, table_w, table_w + 1)
        output = None
        for shift, weight in zip(shifts, weights):
            sampled = F.embedding_bag(rows, table[shift:], mode="sum", per_sample_weights=weight)
            output = sampled if output is None else output + sampled
        ctx.save_for_backward(table, rows, *weights)
        ctx.shifts = shifts
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        table, rows, *weights = ctx.saved_tensors
        shifts = ctx.shifts
        num_bags, bag_size = rows.shape
        num_starts = table.shape[0] - shifts[-1]  # rows + shift < table rows for every corner
        flat_rows = rows.view(-1)
        grad_output = grad_output.contiguous()
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            sorted_rows, order = flat_rows.sort()
            bag_of_entry = order // bag_size
            starts = torch.arange(num_starts, device=rows.device, dtype=rows.dtype)
            offsets = torch.searchsorted(sorted_rows, starts)
            grad_table = torch.zeros_like(table)
            for shift, weight in zip(shifts, weights):
                grad_table[shift : shift + num_starts] += F.embedding_bag(
                    bag_of_entry, grad_output, offsets, mode="sum", per_sample_weights=weight.reshape(-1)[order]
                )
        if any(ctx.needs_input_grad[3:]):
            neighbourhoods = torch.cat([table[shift : shift + num_starts] for shift in shifts], dim=1)
            gathered = neighbourhoods.index_select(0, flat_rows).view(num_bags, bag_size * len(shifts), -1)
            products = torch.bmm(gathered, grad_output.unsqueeze(-1)).view(num_bags, bag_size, len(shifts))
            grad_weights = products.unbind(-1)
        return grad_table, None, None, *(grad_weights or (None,) * len(shifts))


def _cuda_extension_module():
    """The optional compiled extension (`pip install ./dcnv3_cuda`), or `None` if it is not installed."""
    try:
        module = importlib.import_module("dcnv3_cuda")
    except ImportError:
        return None
    # The repository's source folder `dcnv3_cuda/` imports as an empty namespace package when it is on sys.path.
    return module if hasattr(module, "dcnv3_cuda") else None


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def _log_choice(backend: str, device_type: str) -> None:
    logger.info("InternImage DCNv3 backend: %s on %s", backend, device_type)


def resolve_dcn_backend(requested: str | None, device: torch.device) -> str:
    """The one place that decides which DCNv3 implementation runs.

    `INTERNIMAGE_DCN_BACKEND` wins over `requested` (the config's `dcn_backend` or the call's `backend`).
    `"auto"` picks Triton for CUDA tensors when triton is installed, else the CUDA extension when installed,
    else PyTorch. An explicitly requested backend that cannot run raises a `RuntimeError` saying how to get it.
    """
    backend = os.environ.get(BACKEND_ENV_VAR) or requested or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown DCNv3 backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda" and triton_is_available():
            backend = "triton"
        elif device.type == "cuda" and _cuda_extension_module() is not None:
            backend = "cuda"
        else:
            backend = "pytorch"
    elif backend == "triton":
        if not triton_is_available():
            raise RuntimeError("DCNv3 backend 'triton' needs the `triton` package: `pip install triton`")
        if not _triton_runs_on(device):
            raise RuntimeError(
                f"DCNv3 backend 'triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got {device.type}"
                " tensors; use backend='pytorch' or 'auto'"
            )
    elif backend == "cuda":
        if _cuda_extension_module() is None:
            raise RuntimeError(
                "DCNv3 backend 'cuda' needs the optional extension: `pip install ./dcnv3_cuda --no-build-isolation`"
            )
        if device.type != "cuda":
            raise RuntimeError(f"DCNv3 backend 'cuda' runs on CUDA tensors, got {device.type} tensors")
    if not torch.compiler.is_compiling():  # logging inside a traced graph would break it
        _log_choice(backend, device.type)
    return backend


def dcnv3_core(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: int | bool,
    backend: str | None = "auto",
) -> torch.Tensor:
    """DCNv3 core with the official argument order and layouts (see the module docstring), on the chosen backend."""
    args = (
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
        float(offset_scale), int(remove_center),
    )
    chosen = resolve_dcn_backend(backend, input.device)
    if chosen == "triton":
        return dcnv3_triton(input, offset, mask, *args)
    if chosen == "cuda":
        return _cuda_extension_module().dcnv3_cuda(input, offset, mask, *args)
    return dcnv3_core_pytorch(input, offset, mask, *args)


__all__ = ["dcnv3_core", "dcnv3_core_pytorch", "resolve_dcn_backend", "dcnv3_output_size"]
