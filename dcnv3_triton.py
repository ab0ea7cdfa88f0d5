"""DCNv3 core as Triton kernels (forward and backward), registered as `torch.library` custom ops.

Same layouts and semantics as `dcnv3_pytorch.dcnv3_core_pytorch`: `input` (N, H, W, G*Cg) channels-last, `offset`
(N, H_out, W_out, G*P*2) with (dx, dy) pairs, `mask` (N, H_out, W_out, G*P), output (N, H_out, W_out, G*Cg);
points ordered x-outer, y-inner; bilinear sampling with zeros outside the image. Non-finite values give the same
non-finite outputs and gradients (NaN for a NaN or infinite sampling position) and never read outside the input.

One program handles a tile of `BLOCK_W` output pixels of one row, for one group: it walks all P points and reads
the four corner rows of `Cg` channels per point (channels padded to a power of two and masked). Positions,
weights and sums are computed in float32 (float64 for float64 inputs) whatever the input dtypes; the input
gradient is accumulated with atomics into a float32 (float64) buffer and cast at the end. Offsets into the
input are int64, so tensors above 2**31 elements are safe.

The kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (`TRITON_INTERPRET=1`, read when
this module is imported), where autotuning is reduced to a single configuration.
"""

from __future__ import annotations

import os

import torch

try:
    from .dcnv3_custom_ops import DCNv3Spec, checked_spec, register_dcnv3_operators
except ImportError:
    from dcnv3_custom_ops import DCNv3Spec, checked_spec, register_dcnv3_operators

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; `is_available()` says False
    triton = None

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def is_available() -> bool:
    """Whether the Triton kernels can be used (triton importable)."""
    return triton is not None


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cuda" and not (tensor.device.type == "cpu" and INTERPRETING):
        raise RuntimeError(
            f"The Triton DCNv3 kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set before import), "
            f"got {tensor.device.type} tensors; use the 'pytorch' backend instead"
        )


if triton is not None:

    def _autotune_configs() -> list:
        """A few tile widths and warp counts; a single one in the interpreter (which cannot benchmark)."""
        if INTERPRETING:
            return [triton.Config({"BLOCK_W": 32}, num_warps=1)]
        return [
            triton.Config({"BLOCK_W": block_w}, num_warps=num_warps)
            for block_w in (4, 8, 16, 32)
            for num_warps in (2, 4)
        ]

    _AUTOTUNE_KEY = ["width_out", "height_out", "group_channels", "group", "NUM_POINTS_KEY", "BLOCK_C"]

    @triton.jit
    def _tile_coordinates(width_out, height_out, BLOCK_W: tl.constexpr):
        """Batch index (int64), output row, and the (BLOCK_W,) output columns with their validity."""
        tile = tl.program_id(0).to(tl.int64)
        num_w_blocks = tl.cdiv(width_out, BLOCK_W)
        w_block = tile % num_w_blocks
        row = tile // num_w_blocks
        h_out = row % height_out
        n = row // height_out
        w_out = w_block * BLOCK_W + tl.arange(0, BLOCK_W)
        return n, h_out, w_out, w_out < width_out

    @triton.jit
    def _outside_safe_corner(floor, size):
        """`floor` as int32, clamped to [-2, size + 1] (which only moves corners whose 2x2 footprint lies outside the
        image) and -2 for NaN, so the int cast is always defined."""
        clamped = tl.minimum(tl.maximum(floor, -2.0), size + 1.0)
        return tl.where(floor == floor, clamped, -2.0).to(tl.int32)

    @triton.jit
    def _sampling_point(
        offset_ptr, mask_ptr, offset_rows, mask_rows, w_valid, point, tap_x, tap_y, base_x, base_y,
        offset_scale, height, width, ACC_DTYPE: tl.constexpr,
    ):
        """Floor corner (x0, y0), fractions (fx, fy), mask weight of one point for the tile, each (BLOCK_W,).

        The fractions of a NaN or infinite position are NaN (inf - inf), so the point's weights are NaN, as in the
        official grid_sample formulation; its corner is moved outside the image, where nothing is read.
        """
        dx = tl.load(offset_ptr + offset_rows + 2 * point, mask=w_valid, other=0.0).to(ACC_DTYPE)
        dy = tl.load(offset_ptr + offset_rows + 2 * point + 1, mask=w_valid, other=0.0).to(ACC_DTYPE)
        weight = tl.load(mask_ptr + mask_rows + point, mask=w_valid, other=0.0).to(ACC_DTYPE)
        x = (base_x + offset_scale * tap_x) + offset_scale * dx
        y = (base_y + offset_scale * tap_y) + offset_scale * dy
        x_floor = tl.floor(x)
        y_floor = tl.floor(y)
        x0 = _outside_safe_corner(x_floor, width)
        y0 = _outside_safe_corner(y_floor, height)
        return x0, y0, x - x_floor, y - y_floor, weight

    @triton.jit
    def _corner(image_base, x, y, height, width, channels, channel_ids, channel_valid, w_valid):
        """Element offsets (BLOCK_W, BLOCK_C) of the pixel (y, x) rows and the mask of those inside the image."""
        inside = w_valid & (x >= 0) & (x < width) & (y >= 0) & (y < height)
        pixel = (y.to(tl.int64) * width + x) * channels
        return image_base + pixel[:, None] + channel_ids[None, :], inside[:, None] & channel_valid[None, :]

    @triton.autotune(configs=_autotune_configs(), key=_AUTOTUNE_KEY)
    @triton.jit
    def _dcnv3_forward_kernel(
        input_ptr, offset_ptr, mask_ptr, output_ptr,
        height, width, height_out, width_out, group, group_channels,
        stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, center_h, center_w, offset_scale,
        NUM_POINTS_KEY,
        KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, REMOVE_CENTER: tl.constexpr,
        BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        num_points: tl.constexpr = KERNEL_H * KERNEL_W - REMOVE_CENTER
        center_point: tl.constexpr = (KERNEL_H * KERNEL_W - 1) // 2
        g = tl.program_id(1)
        n, h_out, w_out, w_valid = _tile_coordinates(width_out, height_out, BLOCK_W)
        channels = group * group_channels
        channel_ids = tl.arange(0, BLOCK_C)
        channel_valid = channel_ids < group_channels
        image_base = n * height * width * channels + g * group_channels
        out_pixels = (n * height_out + h_out) * width_out + w_out
        offset_rows = (out_pixels * group + g) * (num_points * 2)
        mask_rows = (out_pixels * group + g) * num_points
        base_x = (center_w - pad_w + stride_w * w_out).to(ACC_DTYPE)
        base_y = (center_h - pad_h + stride_h * h_out).to(ACC_DTYPE)
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=ACC_DTYPE)
        for i in tl.static_range(KERNEL_W):
            for j in tl.static_range(KERNEL_H):
                if not (REMOVE_CENTER and i * KERNEL_H + j == center_point):
                    point = i * KERNEL_H + j - REMOVE_CENTER * (i * KERNEL_H + j > center_point)
                    x0, y0, fx, fy, weight = _sampling_point(
                        offset_ptr, mask_ptr, offset_rows, mask_rows, w_valid, point,
                        dilation_w * i - center_w, dilation_h * j - center_h, base_x, base_y,
                        offset_scale, height, width, ACC_DTYPE,
                    )
                    bottom = weight * fy
                    top = weight - bottom
                    # Four corners written out: the Triton compiler only loops over ranges, not tuples.
                    for corner in tl.static_range(4):
                        corner_x = x0 + (corner % 2)
                        corner_y = y0 + (corner // 2)
                        row_weight = bottom if corner // 2 else top
                        corner_weight = row_weight * fx if corner % 2 else row_weight - row_weight * fx
                        ptrs, valid = _corner(
                            image_base, corner_x, corner_y, height, width, channels, channel_ids, channel_valid, w_valid
                        )
                        values = tl.load(input_ptr + ptrs, mask=valid, other=0.0).to(ACC_DTYPE)
                        acc += corner_weight[:, None] * values
        out_ptrs = (out_pixels * channels + g * group_channels)[:, None] + channel_ids[None, :]
        tl.store(output_ptr + out_ptrs, acc, mask=w_valid[:, None] & channel_valid[None, :])

    @triton.autotune(configs=_autotune_configs(), key=_AUTOTUNE_KEY, reset_to_zero=["grad_input_ptr"])
    @triton.jit
    def _dcnv3_backward_kernel(
        input_ptr, offset_ptr, mask_ptr, grad_output_ptr, grad_input_ptr, grad_offset_ptr, grad_mask_ptr,
        height, width, height_out, width_out, group, group_channels,
        stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, center_h, center_w, offset_scale,
        NUM_POINTS_KEY,
        KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, REMOVE_CENTER: tl.constexpr,
        BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        num_points: tl.constexpr = KERNEL_H * KERNEL_W - REMOVE_CENTER
        center_point: tl.constexpr = (KERNEL_H * KERNEL_W - 1) // 2
        g = tl.program_id(1)
        n, h_out, w_out, w_valid = _tile_coordinates(width_out, height_out, BLOCK_W)
        channels = group * group_channels
        channel_ids = tl.arange(0, BLOCK_C)
        channel_valid = channel_ids < group_channels
        image_base = n * height * width * channels + g * group_channels
        out_pixels = (n * height_out + h_out) * width_out + w_out
        offset_rows = (out_pixels * group + g) * (num_points * 2)
        mask_rows = (out_pixels * group + g) * num_points
        base_x = (center_w - pad_w + stride_w * w_out).to(ACC_DTYPE)
        base_y = (center_h - pad_h + stride_h * h_out).to(ACC_DTYPE)
        out_ptrs = (out_pixels * channels + g * group_channels)[:, None] + channel_ids[None, :]
        tile_valid = w_valid[:, None] & channel_valid[None, :]
        grad_output = tl.load(grad_output_ptr + out_ptrs, mask=tile_valid, other=0.0).to(ACC_DTYPE)
        for i in tl.static_range(KERNEL_W):
            for j in tl.static_range(KERNEL_H):
                if not (REMOVE_CENTER and i * KERNEL_H + j == center_point):
                    point = i * KERNEL_H + j - REMOVE_CENTER * (i * KERNEL_H + j > center_point)
                    x0, y0, fx, fy, weight = _sampling_point(
                        offset_ptr, mask_ptr, offset_rows, mask_rows, w_valid, point,
                        dilation_w * i - center_w, dilation_h * j - center_h, base_x, base_y,
                        offset_scale, height, width, ACC_DTYPE,
                    )
                    ptrs_tl, valid_tl = _corner(
                        image_base, x0, y0, height, width, channels, channel_ids, channel_valid, w_valid
                    )
                    ptrs_tr, valid_tr = _corner(
                        image_base, x0 + 1, y0, height, width, channels, channel_ids, channel_valid, w_valid
                    )
                    ptrs_bl, valid_bl = _corner(
                        image_base, x0, y0 + 1, height, width, channels, channel_ids, channel_valid, w_valid
                    )
                    ptrs_br, valid_br = _corner(
                        image_base, x0 + 1, y0 + 1, height, width, channels, channel_ids, channel_valid, w_valid
                    )
                    top_left = tl.load(input_ptr + ptrs_tl, mask=valid_tl, other=0.0).to(ACC_DTYPE)
                    top_right = tl.load(input_ptr + ptrs_tr, mask=valid_tr, other=0.0).to(ACC_DTYPE)
                    bottom_left = tl.load(input_ptr + ptrs_bl, mask=valid_bl, other=0.0).to(ACC_DTYPE)
                    bottom_right = tl.load(input_ptr + ptrs_br, mask=valid_br, other=0.0).to(ACC_DTYPE)
                    gx = fx[:, None]
                    gy = fy[:, None]
                    top = top_left + gx * (top_right - top_left)
                    bottom = bottom_left + gx * (bottom_right - bottom_left)
                    sampled = top + gy * (bottom - top)
                    d_dx = (1.0 - gy) * (top_right - top_left) + gy * (bottom_right - bottom_left)
                    d_dy = bottom - top
                    scaled_weight = weight * offset_scale
                    tl.store(grad_mask_ptr + mask_rows + point, tl.sum(grad_output * sampled, axis=1), mask=w_valid)
                    tl.store(
                        grad_offset_ptr + offset_rows + 2 * point,
                        scaled_weight * tl.sum(grad_output * d_dx, axis=1),
                        mask=w_valid,
                    )
                    tl.store(
                        grad_offset_ptr + offset_rows + 2 * point + 1,
                        scaled_weight * tl.sum(grad_output * d_dy, axis=1),
                        mask=w_valid,
                    )
                    bottom_weight = weight * fy
                    top_weight = weight - bottom_weight
                    tl.atomic_add(
                        grad_input_ptr + ptrs_tl, (top_weight - top_weight * fx)[:, None] * grad_output, mask=valid_tl
                    )
                    tl.atomic_add(grad_input_ptr + ptrs_tr, (top_weight * fx)[:, None] * grad_output, mask=valid_tr)
                    tl.atomic_add(
                        grad_input_ptr + ptrs_bl,
                        (bottom_weight - bottom_weight * fx)[:, None] * grad_output,
                        mask=valid_bl,
                    )
                    tl.atomic_add(
                        grad_input_ptr + ptrs_br, (bottom_weight * fx)[:, None] * grad_output, mask=valid_br
                    )


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_settings(input: torch.Tensor, offset: torch.Tensor, spec: DCNv3Spec) -> tuple:
    """Grid, runtime scalars and constexpr keywords shared by the forward and backward launches."""
    _check_device(input)
    batch, height, width, _ = input.shape
    height_out, width_out = offset.shape[1:3]

    def grid(meta: dict) -> tuple[int, int]:
        return batch * height_out * triton.cdiv(width_out, meta["BLOCK_W"]), spec.group

    scalars = (
        height, width, height_out, width_out, spec.group, spec.group_channels,
        spec.stride_h, spec.stride_w, spec.pad_h, spec.pad_w, spec.dilation_h, spec.dilation_w,
        (spec.dilation_h * (spec.kernel_h - 1)) // 2, (spec.dilation_w * (spec.kernel_w - 1)) // 2, spec.offset_scale,
        spec.num_points,
    )
    constexprs = {
        "KERNEL_H": spec.kernel_h,
        "KERNEL_W": spec.kernel_w,
        "REMOVE_CENTER": spec.remove_center,
        "BLOCK_C": triton.next_power_of_2(spec.group_channels),
        "ACC_DTYPE": tl.float64 if input.dtype == torch.float64 else tl.float32,
    }
    return grid, scalars, constexprs


def _triton_forward(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, spec: DCNv3Spec) -> torch.Tensor:
    """DCNv3 forward: input (N, H, W, G*Cg), offset (N, H_out, W_out, G*P*2), mask (N, H_out, W_out, G*P)
    -> (N, H_out, W_out, G*Cg) in the input dtype."""
    input, offset, mask = input.contiguous(), offset.contiguous(), mask.contiguous()
    output = input.new_empty(*offset.shape[:3], input.shape[-1])
    grid, scalars, constexprs = _launch_settings(input, offset, spec)
    if output.numel() > 0:
        _dcnv3_forward_kernel[grid](input, offset, mask, output, *scalars, **constexprs)
    return output


def _triton_backward(
    grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, spec: DCNv3Spec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (input, offset, mask), each in its tensor's dtype, of the forward for `grad_output`."""
    input, offset, mask = input.contiguous(), offset.contiguous(), mask.contiguous()
    grad_output = grad_output.contiguous()
    grad_input = torch.zeros(input.shape, dtype=_accumulation_dtype(input.dtype), device=input.device)
    grad_offset = torch.zeros_like(offset)
    grad_mask = torch.zeros_like(mask)
    grid, scalars, constexprs = _launch_settings(input, offset, spec)
    if grad_output.numel() > 0:
        _dcnv3_backward_kernel[grid](
            input, offset, mask, grad_output, grad_input, grad_offset, grad_mask, *scalars, **constexprs
        )
    return grad_input.to(input.dtype), grad_offset, grad_mask


dcnv3_triton_operator = (
    register_dcnv3_operators("dcnv3_triton", _triton_forward, _triton_backward) if triton is not None else None
)


def dcnv3_triton(
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
    """DCNv3 core on the Triton kernels, differentiable w.r.t. input, offset and mask.

    input (N, H, W, G*Cg), offset (N, H_out, W_out, G*P*2), mask (N, H_out, W_out, G*P) -> (N, H_out, W_out, G*Cg)
    in the input dtype. offset and mask may have other floating dtypes (e.g. under autocast); all arithmetic is
    float32 (float64 for float64 input).
    """
    spec = checked_spec(
        input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
        group_channels, offset_scale, remove_center,
    )
    return run_dcnv3_triton(input, offset, mask, spec)


def run_dcnv3_triton(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, spec: DCNv3Spec) -> torch.Tensor:
    """`dcnv3_triton` for a checked spec."""
    if triton is None:
        raise RuntimeError("The Triton DCNv3 kernels need the `triton` package: `pip install triton`")
    return dcnv3_triton_operator(input, offset, mask, *spec)


__all__ = ["dcnv3_triton", "is_available", "run_dcnv3_triton"]
