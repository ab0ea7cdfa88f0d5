"""What the DCNv3 backends share: the hyper-parameters of a call (`DCNv3Spec`), the one check of a call
(`checked_spec`), the output size, and the registration of an implementation as `torch.library` custom operators.

Every backend takes the official layouts: input (N, H, W, G*Cg), offset (N, H_out, W_out, G*P*2), mask
(N, H_out, W_out, G*P) and the hyper-parameters, and returns (N, H_out, W_out, G*Cg).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, get_type_hints

import torch

# The operator definitions registered by this copy of the module, kept alive for the life of the process.
_DEFINITIONS: list = []


def dcnv3_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Spatial output size of the DCNv3 core along one axis."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


class DCNv3Spec(NamedTuple):
    """The hyper-parameters of a DCNv3 call, in the official argument order (after input, offset and mask)."""

    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dilation_h: int
    dilation_w: int
    group: int
    group_channels: int
    offset_scale: float
    remove_center: int

    @property
    def num_points(self) -> int:
        """P, the sampling points of each group."""
        return self.kernel_h * self.kernel_w - self.remove_center

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H_out, W_out) for an input of (height, width)."""
        return (
            dcnv3_output_size(height, self.kernel_h, self.stride_h, self.pad_h, self.dilation_h),
            dcnv3_output_size(width, self.kernel_w, self.stride_w, self.pad_w, self.dilation_w),
        )


# The smallest valid value of each integer hyper-parameter.
_LOWEST = {"kernel_h": 1, "kernel_w": 1, "stride_h": 1, "stride_w": 1, "pad_h": 0, "pad_w": 0, "dilation_h": 1,
           "dilation_w": 1, "group": 1, "group_channels": 1, "remove_center": 0}


def checked_spec(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *hyper_parameters: int | float | bool
) -> DCNv3Spec:
    """The spec of a call with the official arguments (integers, and a float `offset_scale`), after checking that
    the hyper-parameters are in range and the tensors fit them; raises a `ValueError` saying what does not fit."""
    *integers, offset_scale, remove_center = hyper_parameters
    spec = DCNv3Spec(*(int(value) for value in integers), float(offset_scale), int(remove_center))
    for name, low in _LOWEST.items():
        if getattr(spec, name) < low:
            raise ValueError(f"DCNv3 `{name}` must be at least {low}, got {getattr(spec, name)}")
    if spec.remove_center > 1:
        raise ValueError(f"DCNv3 `remove_center` is 0 or 1, got {spec.remove_center}")
    channels = spec.group * spec.group_channels
    if input.dim() != 4 or input.shape[-1] != channels or not input.is_floating_point():
        raise ValueError(
            f"input must be a floating (N, H, W, group * group_channels = {channels}) tensor, got {input.dtype} of "
            f"shape {tuple(input.shape)}"
        )
    batch, height, width, _ = input.shape
    points = spec.group * spec.num_points
    for name, tensor, last, meaning in (
        ("offset", offset, 2 * points, "group * points * 2"), ("mask", mask, points, "group * points")
    ):
        expected = (batch, *spec.output_size(height, width), last)
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{name} must have shape {expected} for these arguments (last dimension {meaning}), "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.device != input.device:
            raise ValueError(f"{name} is on {tensor.device} but input is on {input.device}; move them together")
    return spec


def _fake_forward(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *_) -> torch.Tensor:
    """Output of the offsets' spatial size with the input's channels."""
    return input.new_empty(*offset.shape[:3], input.shape[-1])


def _fake_backward(grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *_):
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _save_inputs(ctx, inputs: tuple, output: torch.Tensor) -> None:
    input, offset, mask, *hyper_parameters = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.hyper_parameters = hyper_parameters


_HYPER_PARAMETERS = ", ".join(f"{hint.__name__} {name}" for name, hint in get_type_hints(DCNv3Spec).items())
_FORWARD_SCHEMA = f"(Tensor input, Tensor offset, Tensor mask, {_HYPER_PARAMETERS}) -> Tensor"
_BACKWARD_SCHEMA = (
    f"(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, {_HYPER_PARAMETERS}) -> (Tensor, Tensor, Tensor)"
)


def register_dcnv3_operators(name: str, forward: Callable, backward: Callable):
    """The operator `internimage::{name}_forward` running `forward`, differentiable w.r.t. input, offset and mask
    through `internimage::{name}_backward` running `backward`.

    `forward(input, offset, mask, spec)` returns the output and `backward(grad_output, input, offset, mask, spec)`
    the three gradients, for a checked `DCNv3Spec`; the operators take the hyper-parameters flat, in the official
    order. Registered once per process: the op files can be imported under several names (from the repository root
    and as the remote code of each loaded folder), and registering again would invalidate the handles the first
    registration holds, so later calls return the operator already registered.
    """
    namespace = torch.ops.internimage
    if not hasattr(namespace, f"{name}_forward"):

        def flat_forward(input, offset, mask, *hyper_parameters):
            return forward(input, offset, mask, DCNv3Spec(*hyper_parameters))

        def flat_backward(grad_output, input, offset, mask, *hyper_parameters):
            return backward(grad_output, input, offset, mask, DCNv3Spec(*hyper_parameters))

        forward_op = torch.library.custom_op(
            f"internimage::{name}_forward", flat_forward, mutates_args=(), schema=_FORWARD_SCHEMA
        )
        backward_op = torch.library.custom_op(
            f"internimage::{name}_backward", flat_backward, mutates_args=(), schema=_BACKWARD_SCHEMA
        )
        forward_op.register_fake(_fake_forward)
        backward_op.register_fake(_fake_backward)

        def differentiate(ctx, grad_output: torch.Tensor) -> tuple:
            grads = backward_op(grad_output, *ctx.saved_tensors, *ctx.hyper_parameters)
            return (*grads, *([None] * len(ctx.hyper_parameters)))

        forward_op.register_autograd(differentiate, setup_context=_save_inputs)
        _DEFINITIONS.append((forward_op, backward_op))
    return getattr(namespace, f"{name}_forward")


__all__ = ["DCNv3Spec", "checked_spec", "dcnv3_output_size", "register_dcnv3_operators"]
