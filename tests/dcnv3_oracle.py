"""Clean-room DCNv3 oracle, written step by step from the official PyTorch op, `dcnv3_core_pytorch`
(`classification/ops_dcnv3/functions/dcnv3_func.py` L171-219, helpers L107-168).

It follows the official `grid_sample` formulation step by step: zero-pad the input, reference points at pixel
centres normalised by the padded size, the dilation grid (x-outer, y-inner point order, scaled by `offset_scale`
together with the offsets), `grid_sample(bilinear, zeros, align_corners=False)`, the mask multiply and the sum over
points. Sampling grids are built in the input's dtype, so float64 inputs get float64 grids (the fixtures'
`*_f64ref` fields). `oracle_dcnv3_module_forward` is the official module forward (layout copies included) around
the oracle op. The tests use both as the reference; `tests/official_reference.py` (the whole official model) and
`benchmarks/bench_cpu.py` (the op alone) use the op. `random_case` and `run_op` make the random cases the op tests
compare on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def oracle_dcnv3_core(
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
    """(N, H, W, G*Cg), (N, Ho, Wo, G*P*2), (N, Ho, Wo, G*P) -> (N, Ho, Wo, G*Cg)."""
    input = F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])
    batch, padded_h, padded_w, _ = input.shape
    _, height_out, width_out, _ = offset.shape
    dtype, device = input.dtype, input.device

    # Reference points: centre of each output pixel's first tap, normalised by the padded size; last dim (x, y).
    ref_y = ((dilation_h * (kernel_h - 1)) // 2 + 0.5 + stride_h * torch.arange(height_out, dtype=dtype)) / padded_h
    ref_x = ((dilation_w * (kernel_w - 1)) // 2 + 0.5 + stride_w * torch.arange(width_out, dtype=dtype)) / padded_w
    ref_y, ref_x = torch.meshgrid(ref_y, ref_x, indexing="ij")
    reference = torch.stack((ref_x, ref_y), dim=-1).view(1, height_out, width_out, 1, 2).to(device)

    # Dilation grid: x outer, y inner, normalised; repeated for every group (group-major).
    taps_x = -((dilation_w * (kernel_w - 1)) // 2) + dilation_w * torch.arange(kernel_w, dtype=dtype)
    taps_y = -((dilation_h * (kernel_h - 1)) // 2) + dilation_h * torch.arange(kernel_h, dtype=dtype)
    grid_x, grid_y = torch.meshgrid(taps_x, taps_y, indexing="ij")
    grid = torch.stack((grid_x / padded_w, grid_y / padded_h), dim=-1).view(-1, 2)
    if remove_center:
        keep = torch.arange(kernel_h * kernel_w) != (kernel_h * kernel_w - 1) // 2
        grid = grid[keep]
    num_points = grid.shape[0]
    grid = grid.repeat(group, 1).view(1, 1, 1, group * num_points, 2).to(device)

    scale = torch.tensor([padded_w, padded_h], dtype=dtype, device=device)
    locations = reference + grid * offset_scale
    locations = locations + offset.view(batch, height_out, width_out, group * num_points, 2) * offset_scale / scale

    sampling_grid = 2 * locations - 1
    values = input.view(batch, padded_h * padded_w, group * group_channels).transpose(1, 2)
    values = values.reshape(batch * group, group_channels, padded_h, padded_w)
    sampling_grid = sampling_grid.view(batch, height_out * width_out, group, num_points, 2).transpose(1, 2)
    sampling_grid = sampling_grid.flatten(0, 1)
    sampled = F.grid_sample(values, sampling_grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    mask = mask.view(batch, height_out * width_out, group, num_points).transpose(1, 2)
    mask = mask.reshape(batch * group, 1, height_out * width_out, num_points)
    output = (sampled * mask).sum(-1).view(batch, group * group_channels, height_out * width_out)
    return output.transpose(1, 2).reshape(batch, height_out, width_out, -1).contiguous()


def oracle_dcnv3_module_forward(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The official DCNv3 module forward (`classification/ops_dcnv3/modules/dcnv3.py` L318-356) with the oracle core,
    on an `InternImageDCNv3`'s parameters."""
    batch, height, width, _ = hidden_states.shape
    values = module.input_proj(hidden_states)
    features = module.dw_conv(hidden_states.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    features = module.dw_act(module.dw_norm(features))
    offset = module.offset(features)
    mask = module.mask(features).reshape(batch, height, width, module.groups, -1).softmax(-1)
    mask = mask.reshape(batch, height, width, -1)
    pad = (module.kernel_size - 1) // 2
    output = oracle_dcnv3_core(
        values, offset, mask, module.kernel_size, module.kernel_size, 1, 1, pad, pad, 1, 1,
        module.groups, module.group_channels, module.offset_scale, module.remove_center,
    )
    if module.center_feature_scale_proj is not None:
        scale = module.center_feature_scale_proj(features).sigmoid()
        scale = scale[..., None].repeat(1, 1, 1, 1, module.group_channels).flatten(-2)
        output = output * (1 - scale) + values * scale
    return module.output_proj(output)


HYPER_PARAMETERS = (
    "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w", "group",
    "group_channels", "offset_scale", "remove_center",
)
GRADIENTS = ("input", "offset", "mask")


def run_op(op, inputs: dict[str, torch.Tensor], args: tuple, grad_weight: torch.Tensor, dtype: torch.dtype):
    """Output and gradients of `sum(op(...) * grad_weight)` w.r.t. input, offset and mask, computed in `dtype`."""
    leaves = {name: inputs[name].detach().to(dtype).requires_grad_() for name in GRADIENTS}
    output = op(*leaves.values(), *args)
    (output * grad_weight.to(dtype)).sum().backward()
    return output.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def random_case(
    batch: int = 2,
    height: int = 7,
    width: int = 9,
    kernel: int = 3,
    stride: int = 1,
    pad: int = 1,
    dilation: int = 1,
    group: int = 2,
    group_channels: int = 4,
    offset_scale: float = 1.0,
    remove_center: int = 0,
    offset_std: float = 2.0,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], tuple, torch.Tensor]:
    """float64 (input, offset, mask), the op's hyper-parameters and a random output weight."""
    generator = torch.Generator().manual_seed(seed)
    height_out, width_out = ((size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1 for size in (height, width))
    points = kernel * kernel - remove_center
    out_shape = (batch, height_out, width_out)
    inputs = {
        "input": torch.randn(batch, height, width, group * group_channels, generator=generator, dtype=torch.float64),
        "offset": offset_std * torch.randn(*out_shape, group * points * 2, generator=generator, dtype=torch.float64),
        "mask": torch.randn(*out_shape, group, points, generator=generator, dtype=torch.float64)
        .softmax(-1)
        .flatten(-2),
    }
    args = (kernel, kernel, stride, stride, pad, pad, dilation, dilation, group, group_channels, offset_scale,
            remove_center)
    grad_weight = torch.randn(*out_shape, group * group_channels, generator=generator, dtype=torch.float64)
    return inputs, args, grad_weight
