"""DCNv3 (InternImage) CUDA kernels as PyTorch operators: `torch.ops.dcnv3_cuda.forward` / `.backward`.

`dcnv3_cuda(...)` is the differentiable entry point used by InternImage's `dcnv3_core(..., backend="cuda")`. The
fake-tensor and autograd registrations below let `torch.compile` trace it without graph breaks.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the torch.ops.dcnv3_cuda operators)
except ImportError as error:
    raise ImportError(
        f"The dcnv3_cuda kernels are not compiled here ({error}). Build them from the InternImage repository with "
        "`pip install ./dcnv3_cuda --no-build-isolation`."
    ) from error

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


@torch.library.register_fake("dcnv3_cuda::forward")
def _forward_fake(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int, stride_h: int,
    stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
    offset_scale: float, remove_center: int,
) -> torch.Tensor:
    batch, height, width, channels = input.shape
    height_out = _output_size(height, kernel_h, stride_h, pad_h, dilation_h)
    width_out = _output_size(width, kernel_w, stride_w, pad_w, dilation_w)
    return input.new_empty(batch, height_out, width_out, channels)


@torch.library.register_fake("dcnv3_cuda::backward")
def _backward_fake(
    grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *args
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    input, offset, mask, *hyper_parameters = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.hyper_parameters = hyper_parameters


def _backward(ctx, grad_output: torch.Tensor) -> tuple:
    input, offset, mask = ctx.saved_tensors
    grad_input, grad_offset, grad_mask = torch.ops.dcnv3_cuda.backward(
        grad_output.contiguous(), input, offset, mask, *ctx.hyper_parameters
    )
    return (grad_input, grad_offset, grad_mask) + (None,) * len(ctx.hyper_parameters)


torch.library.register_autograd("dcnv3_cuda::forward", _backward, setup_context=_setup_context)


def dcnv3_cuda(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int, stride_h: int,
    stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
    offset_scale: float, remove_center: int | bool,
) -> torch.Tensor:
    """DCNv3 core on CUDA tensors, differentiable with respect to `input`, `offset` and `mask`.

    Args:
        input: (N, H, W, group * group_channels), float16, bfloat16, float32 or float64.
        offset: (N, H_out, W_out, group * P * 2) (dx, dy) pixel offsets, P = kernel_h * kernel_w - remove_center.
        mask: (N, H_out, W_out, group * P) point weights (softmax-normalised over P by the DCNv3 layer).

    `offset` and `mask` are cast to `input.dtype`; the kernels accumulate in float32 (float64 for float64).

    Returns:
        (N, H_out, W_out, group * group_channels) in `input.dtype`.
    """
    tensors = {"input": input, "offset": offset, "mask": mask}
    for name, tensor in tensors.items():
        if tensor.device.type != "cuda":
            raise RuntimeError(
                f"dcnv3_cuda runs on CUDA tensors, got {name} on {tensor.device}; move the tensors to a GPU or use "
                "the PyTorch backend (dcnv3_core(..., backend='pytorch'))"
            )
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dcnv3_cuda supports {SUPPORTED_DTYPES}, got input of dtype {input.dtype}")
    return torch.ops.dcnv3_cuda.forward(
        input.contiguous(),
        offset.to(input.dtype).contiguous(),
        mask.to(input.dtype).contiguous(),
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
        float(offset_scale), int(remove_center),
    )


__all__ = ["dcnv3_cuda"]
