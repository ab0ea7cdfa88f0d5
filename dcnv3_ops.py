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


def _sampling_points(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling positions (x, y) in un-padded input pixels, each (N, H_out, W_out, G, P)."""
    batch, height_out, width_out, _ = offset.shape
    device = offset.device
    tap_x = _kernel_taps(kernel_w, dilation_w, device, dtype).repeat_interleave(kernel_h)
    tap_y = _kernel_taps(kernel_h, dilation_h, device, dtype).repeat(kernel_w)
    if remove_center:
        keep = torch.arange(kernel_h * kernel_w, device=device) != (kernel_h * kernel_w - 1) // 2
        tap_x, tap_y = tap_x[keep], tap_y[keep]
    num_points = tap_x.numel()
    start_x = (dilation_w * (kernel_w - 1)) // 2 - pad_w
    start_y = (dilation_h * (kernel_h - 1)) // 2 - pad_h
    base_x = start_x + stride_w * torch.arange(width_out, device=device, dtype=dtype)
    base_y = start_y + stride_h * torch.arange(height_out, device=device, dtype=dtype)
    offset = offset.view(batch, height_out, width_out, group, num_points, 2).to(dtype)
    x = base_x.view(1, 1, -1, 1, 1) + offset_scale * (tap_x + offset[..., 0])
    y = base_y.view(1, -1, 1, 1, 1) + offset_scale * (tap_y + offset[..., 1])
    return x, y


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

    Each output is a weighted sum of the 4 * P bilinear corner rows of its group, computed in one
    `F.embedding_bag` call (no (N, H_out, W_out, G, P, Cg) intermediate). Positions are computed in float64 for
    float64 inputs and in float32 otherwise.
    """
    batch, height, width, channels = input.shape
    if channels != group * group_channels:
        raise ValueError(f"input has {channels} channels, expected group * group_channels = {group * group_channels}")
    position_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x, y = _sampling_points(
        offset, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
        offset_scale, int(remove_center), position_dtype,
    )
    _, height_out, width_out, _, num_points = x.shape
    if mask.shape[-1] != group * num_points:
        raise ValueError(f"mask has {mask.shape[-1]} channels, expected group * points = {group * num_points}")
    x0, y0 = x.floor(), y.floor()
    frac_x, frac_y = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    corner_x = torch.stack((x0, x0 + 1, x0, x0 + 1), dim=-1)
    corner_y = torch.stack((y0, y0, y0 + 1, y0 + 1), dim=-1)
    weight_x = torch.stack((1 - frac_x, frac_x, 1 - frac_x, frac_x), dim=-1)
    weight_y = torch.stack((1 - frac_y, 1 - frac_y, frac_y, frac_y), dim=-1)
    inside = (corner_x >= 0) & (corner_x < width) & (corner_y >= 0) & (corner_y < height)
    mask = mask.view(batch, height_out, width_out, group, num_points, 1).to(position_dtype)
    weights = (weight_x * weight_y * inside * mask).to(input.dtype)
    # Row of corner (x, y) of group g in the (N * H * W * G, Cg) table; corners outside the image point at row 0
    # with weight 0.
    batch_index = torch.arange(batch, device=input.device).view(-1, 1, 1, 1, 1, 1)
    group_index = torch.arange(group, device=input.device).view(1, 1, 1, -1, 1, 1)
    rows = ((batch_index * height + corner_y) * width + corner_x) * group + group_index
    rows = torch.where(inside, rows, 0)
    output = F.embedding_bag(
        rows.view(-1, num_points * 4),
        input.reshape(-1, group_channels),
        mode="sum",
        per_sample_weights=weights.view(-1, num_points * 4),
    )
    return output.view(batch, height_out, width_out, channels)


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
