"""What the DCNv3 backends share: the output size, and the registration of an implementation (a forward and its
backward) as a pair of `torch.library` custom operators.

Both backends registered this way (the PyTorch one in `dcnv3_pytorch.py`, the Triton one in `dcnv3_triton.py`) take the
official layouts: input (N, H, W, G*Cg), offset (N, H_out, W_out, G*P*2), mask (N, H_out, W_out, G*P) and the
hyper-parameters, and return (N, H_out, W_out, G*Cg).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The operator definitions registered by this copy of the module, kept alive for the life of the process.
_DEFINITIONS: list = []


def dcnv3_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Spatial output size of the DCNv3 core along one axis."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _fake_forward(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *_) -> torch.Tensor:
    """Output of the offsets' spatial size with the input's channels."""
    return input.new_empty(*offset.shape[:3], input.shape[-1])


def _fake_backward(grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *_):
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _save_inputs(ctx, inputs: tuple, output: torch.Tensor) -> None:
    input, offset, mask, *arguments = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.arguments = arguments


def register_dcnv3_operators(name: str, forward: Callable, backward: Callable):
    """The operator `internimage::{name}_forward` running `forward`, differentiable w.r.t. input, offset and mask
    through `internimage::{name}_backward` running `backward`.

    `forward(input, offset, mask, *hyper_parameters)` returns the output and `backward(grad_output, input, offset,
    mask, *hyper_parameters)` the three gradients; both carry the type hints custom operators are built from.
    Registered once per process: the op files can be imported under several names (from the repository root and as
    the remote code of each loaded folder), and registering again would invalidate the handles the first
    registration holds, so later calls return the operator already registered.
    """
    namespace = torch.ops.internimage
    if not hasattr(namespace, f"{name}_forward"):
        forward_op = torch.library.custom_op(f"internimage::{name}_forward", forward, mutates_args=())
        backward_op = torch.library.custom_op(f"internimage::{name}_backward", backward, mutates_args=())
        forward_op.register_fake(_fake_forward)
        backward_op.register_fake(_fake_backward)

        def differentiate(ctx, grad_output: torch.Tensor) -> tuple:
            grads = backward_op(grad_output, *ctx.saved_tensors, *ctx.arguments)
            return (*grads, *([None] * len(ctx.arguments)))

        forward_op.register_autograd(differentiate, setup_context=_save_inputs)
        _DEFINITIONS.append((forward_op, backward_op))
    return getattr(namespace, f"{name}_forward")


__all__ = ["dcnv3_output_size", "register_dcnv3_operators"]
