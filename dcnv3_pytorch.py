"""DCNv3 core as plain PyTorch operators: the implementation every device can run, and the CPU default.

`dcnv3_core_pytorch` takes the official arguments and layouts (`dcnv3_ops.py` states them with the semantics of
non-finite values); forward and backward are registered as the `internimage::dcnv3_pytorch_*` custom operators.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    from .dcnv3_custom_ops import DCNv3Spec, checked_spec, register_dcnv3_operators
except ImportError:
    from dcnv3_custom_ops import DCNv3Spec, checked_spec, register_dcnv3_operators

_CPU_CHUNK_POINTS = 2**17


def _kernel_taps(kernel: int, dilation: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Offsets of the kernel taps along one axis, in pixels: `-((d * (k - 1)) // 2) + d * t` (as the official op)."""
    return -((dilation * (kernel - 1)) // 2) + dilation * torch.arange(kernel, device=device, dtype=dtype)


def _reuses_constants(function: Callable) -> Callable:
    """Memoises `function`, whose tensors only depend on its (hashable) arguments and are never modified: the op
    builds them for every call, which at small feature maps costs as much as the arithmetic. Not while tracing
    (torch.compile / torch.export), whose tensors must belong to the trace."""
    memoised = functools.lru_cache(maxsize=256)(function)

    @functools.wraps(function)
    def wrapper(*args):
        return function(*args) if torch.compiler.is_compiling() else memoised(*args)

    return wrapper


@_reuses_constants
def _regular_grid(
    height_out: int, width_out: int, spec: DCNv3Spec, shift: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling positions x (W_out, 1, P) and y (H_out, 1, 1, P) of zero offsets: output pixel origin plus the
    kernel tap scaled by `offset_scale`, in un-padded input pixels plus `shift`."""
    tap_x = _kernel_taps(spec.kernel_w, spec.dilation_w, device, dtype).repeat_interleave(spec.kernel_h)
    tap_y = _kernel_taps(spec.kernel_h, spec.dilation_h, device, dtype).repeat(spec.kernel_w)
    if spec.remove_center:
        taps = spec.kernel_h * spec.kernel_w
        keep = torch.arange(taps, device=device) != (taps - 1) // 2
        tap_x, tap_y = tap_x[keep], tap_y[keep]
    start_x = (spec.dilation_w * (spec.kernel_w - 1)) // 2 - spec.pad_w + shift
    start_y = (spec.dilation_h * (spec.kernel_h - 1)) // 2 - spec.pad_h + shift
    grid_x = start_x + spec.stride_w * torch.arange(width_out, device=device, dtype=dtype).view(-1, 1, 1)
    grid_y = start_y + spec.stride_h * torch.arange(height_out, device=device, dtype=dtype).view(-1, 1, 1, 1)
    return grid_x + spec.offset_scale * tap_x, grid_y + spec.offset_scale * tap_y


def _sampling_positions(
    offset: torch.Tensor, spec: DCNv3Spec, dtype: torch.dtype, shift: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling positions x and y in un-padded input pixels plus `shift`, each (N, H_out, W_out, G, P), in `dtype`."""
    batch, height_out, width_out, _ = offset.shape
    regular_x, regular_y = _regular_grid(height_out, width_out, spec, shift, offset.device, dtype)
    # In the position dtype first: mixed-dtype arithmetic is several times slower on CPU than a conversion.
    offset = offset.view(batch, height_out, width_out, spec.group, spec.num_points, 2).to(dtype)
    x = torch.add(regular_x, offset[..., 0], alpha=spec.offset_scale)
    y = torch.add(regular_y, offset[..., 1], alpha=spec.offset_scale)
    return x, y


@_reuses_constants
def _image_group_rows(
    batch: int, group: int, rows_per_image: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(N, 1, 1, G, 1): the table row of each image's first pixel for each group."""
    images = torch.arange(batch, device=device, dtype=dtype).view(batch, 1, 1, 1, 1) * rows_per_image
    return images + torch.arange(group, device=device, dtype=dtype).view(group, 1)


@_reuses_constants
def _bag_starts(num_entries: int, bag_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The first entry of each bag of `bag_size` consecutive entries (`embedding_bag` offsets)."""
    return torch.arange(0, num_entries, bag_size, device=device, dtype=dtype)


class _BilinearSampling(NamedTuple):
    """Where each sampling point reads the zero-bordered table (see `_zero_bordered_table`), and with what weight.

    All (B, P) with B = N * H_out * W_out * G bags of P points, in the order of the output rows (n, i, j, g).
    A point without a corner in the image reads four zero border rows (so its value and position gradient are zero),
    and a point with a NaN position reads the zero rows at its image's top-left corner.
    """

    rows: torch.Tensor  # table row of the top-left bilinear corner (int32, or int64 for huge tables)
    frac_x: torch.Tensor  # fractional position right of that corner, in the position dtype (NaN if not finite)
    frac_y: torch.Tensor  # fractional position below that corner
    mask: torch.Tensor  # the modulation mask, in the position dtype
    corner_shifts: tuple[int, int, int, int]  # row offsets of the corners: top-left, top-right, bottom-left/-right

    def corner_weights(self, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """mask * bilinear weight of each corner in `dtype`, one at a time (in the order of `corner_shifts`).

        Consumes the fractions (updated in place, so that only two new tensors are made).
        """
        bottom = self.frac_y.mul_(self.mask)
        top = self.mask - bottom
        right = top * self.frac_x
        yield top.sub_(right).to(dtype)
        yield right.to(dtype)
        right = self.frac_x.mul_(bottom)
        yield bottom.sub_(right).to(dtype)
        yield right.to(dtype)


def _zero_bordered_table(input: torch.Tensor, group_channels: int) -> torch.Tensor:
    """(N * (H + 4) * (W + 4) * G, Cg), the input with two zero pixels around each image, one row per pixel and
    group: channels g * Cg ... (g + 1) * Cg - 1 of pixel (y, x) of image n are row
    ((n * (H + 4) + y + 2) * (W + 4) + x + 2) * G + g."""
    return F.pad(input, (0, 0, 2, 2, 2, 2)).view(-1, group_channels)


def _bilinear_sampling(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, spec: DCNv3Spec
) -> _BilinearSampling:
    """Table rows and bilinear fractions of every sampling point; positions are computed in float64 for float64
    inputs and in float32 otherwise."""
    batch, height, width, _ = input.shape
    position_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    # Positions in the table's coordinates (two border pixels on the top and left).
    x, y = _sampling_positions(offset, spec, position_dtype, shift=2.0)
    num_points, group = spec.num_points, spec.group
    table_h, table_w = height + 4, width + 4
    # The top-left corner's column and row, and the fractions (x and y are fresh tensors: updated in place to keep
    # the op's peak memory low). An infinite position's fraction is inf - inf = NaN, as in grid_sample.
    corner_x, corner_y = torch.floor(x), torch.floor(y)
    frac_x, frac_y = x.sub_(corner_x), y.sub_(corner_y)
    # Corners of a point without a corner in the image move into the two-pixel zero border, where all four read zero
    # whatever the fractions are; a NaN corner (NaN position) moves to the zero pixel (0, 0) and keeps NaN weights.
    corner_x.clamp_(0, width + 2)
    corner_y.clamp_(0, height + 2)
    rows_per_image = table_h * table_w * group
    # int64 when exporting: ONNX graphs with a dynamic batch mix the index arithmetic with int64 shape values.
    needs_int64 = torch.compiler.is_exporting() or batch * rows_per_image >= 2**31
    index_dtype = torch.int64 if needs_int64 else torch.int32
    # The row within the image in floating point (exact below 2**24 in float32), then one integer conversion.
    row_dtype = position_dtype if rows_per_image <= 2**24 else torch.float64
    pixel = corner_x.to(row_dtype).add_(corner_y.to(row_dtype), alpha=table_w).nan_to_num_(nan=0.0)
    image_group = _image_group_rows(batch, group, rows_per_image, input.device, index_dtype)
    rows = pixel.mul_(group).to(index_dtype).add_(image_group).view(-1, num_points)
    row_below = table_w * group
    return _BilinearSampling(
        rows=rows,
        frac_x=frac_x.view(-1, num_points),
        frac_y=frac_y.view(-1, num_points),
        mask=mask.reshape(-1, num_points).to(position_dtype),
        corner_shifts=(0, group, row_below, row_below + group),
    )


def _sparse_products(table: torch.Tensor) -> bool:
    """Whether the bag sums run as products of sparse CSR matrices (rows: bags, one column per sampled row, the
    corner weights as values) with the table: on CPU in float32 and float64, where these sparse-dense products are
    about 2x faster than `embedding_bag` and accumulate all four corners in one output. Half-precision tables (which
    they do not take), other devices and `torch.export` (ONNX has no sparse tensors) keep `embedding_bag`."""
    cpu_float = table.device.type == "cpu" and table.dtype in (torch.float32, torch.float64)
    return cpu_float and not torch.compiler.is_exporting()


def _csr(row_starts: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR matrix of the given parts; a row may hold a column twice (two points reading the same corner),
    so the invariants are not checked."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(row_starts, columns, values, size=size, check_invariants=False)


def _image_chunks(mask: torch.Tensor) -> list[slice]:
    """The slices of the batch the CPU backward processes together: about `_CPU_CHUNK_POINTS` sampling points at a
    time, so that the table and the temporaries of a chunk stay cache-sized (1.15x faster at T's first stage), once
    there are more than twice that many. One slice on other devices and under `torch.export` (whose graphs keep the
    batch size dynamic)."""
    batch = mask.shape[0]
    if mask.device.type != "cpu" or torch.compiler.is_exporting() or mask.numel() <= 2 * _CPU_CHUNK_POINTS:
        return [slice(0, batch)]
    images = max(1, _CPU_CHUNK_POINTS // max(1, mask[0].numel()))
    return [slice(start, start + images) for start in range(0, batch, images)]


def _sample(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, spec: DCNv3Spec) -> torch.Tensor:
    """The forward of a batch: each output is the sum over its points and their four bilinear corners of weight *
    corner row of the zero-bordered table (no (N, H_out, W_out, G, P, Cg) intermediate), one corner at a time as
    sparse-dense products (`_sparse_products`) or `F.embedding_bag` calls."""
    sampling = _bilinear_sampling(input, offset, mask, spec)
    group_channels = spec.group_channels
    table = _zero_bordered_table(input, group_channels)
    rows = sampling.rows.view(-1)
    num_bags, num_points = sampling.rows.shape
    corners = zip(sampling.corner_shifts, sampling.corner_weights(input.dtype))
    if _sparse_products(table):
        num_starts = table.shape[0] - sampling.corner_shifts[-1]  # rows + shift < table rows for every corner
        row_starts = _bag_starts(rows.numel() + 1, num_points, rows.device, rows.dtype)
        output = table.new_empty(num_bags, group_channels)
        for corner, (shift, weight) in enumerate(corners):
            weights = _csr(row_starts, rows, weight.view(-1), (num_bags, num_starts))
            torch.addmm(output, weights, table[shift : shift + num_starts], beta=min(corner, 1), out=output)
    else:
        bag_starts = _bag_starts(rows.numel(), num_points, rows.device, rows.dtype)
        sums = [
            F.embedding_bag(rows, table[shift:], bag_starts, mode="sum", per_sample_weights=weight.view(-1))
            for shift, weight in corners
        ]
        output = sums[0].add_(sums[1]).add_(sums[2]).add_(sums[3])
    return output.view(*offset.shape[:3], input.shape[-1])


def _in_float32_on_cpu(tensor: torch.Tensor) -> bool:
    """Half-precision CPU inputs are computed in float32: the sparse products take float32, and the weights then
    need no conversions (about 10% faster than half-precision `embedding_bag`, and more accurate)."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float16, torch.bfloat16)


def _forward(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, spec: DCNv3Spec) -> torch.Tensor:
    """The forward as plain differentiable PyTorch operators (`_sample`)."""
    if _in_float32_on_cpu(input):
        return _sample(input.float(), offset, mask.float(), spec).to(input.dtype)
    return _sample(input, offset, mask, spec)


def _corner_products(
    sampling: _BilinearSampling, table: torch.Tensor, grad_output: torch.Tensor
) -> list[torch.Tensor]:
    """Four (B, P), one per corner: the dot product of each bag's output gradient (B, Cg) with each of its points'
    corner rows, in the position dtype: with `torch.sparse.sampled_addmm` where the bags are sparse products
    (`_sparse_products`), else by gathering."""
    if _sparse_products(table):
        return _sampled_corner_products(sampling, table, grad_output)
    return _gathered_corner_products(sampling, table, grad_output)


def _sampled_corner_products(
    sampling: _BilinearSampling, table: torch.Tensor, grad_output: torch.Tensor
) -> list[torch.Tensor]:
    """The products as the entries of `grad_output @ table[shift:].T` at the sampled (bag, row) pairs, one corner
    at a time: `sampled_addmm` computes just those (about 3x faster than gathering the rows on CPU)."""
    num_bags, num_points = sampling.rows.shape
    shifts = sampling.corner_shifts
    num_starts = table.shape[0] - shifts[-1]  # rows + shift < table rows for every corner
    row_starts = _bag_starts(sampling.rows.numel() + 1, num_points, sampling.rows.device, sampling.rows.dtype)
    products = []
    for shift in shifts:
        values = table.new_zeros(num_bags, num_points)
        pattern = _csr(row_starts, sampling.rows.view(-1), values.view(-1), (num_bags, num_starts))
        # Written into the pattern's own values (`out=`): about 2x faster than a new sparse result.
        torch.sparse.sampled_addmm(pattern, grad_output, table[shift : shift + num_starts].t(), beta=0.0, out=pattern)
        products.append(values.to(sampling.mask.dtype))
    return products


def _gathered_corner_products(
    sampling: _BilinearSampling, table: torch.Tensor, grad_output: torch.Tensor
) -> list[torch.Tensor]:
    """The products from the corner rows gathered as a 2x2-neighbourhood table and multiplied with `bmm`."""
    num_bags, num_points = sampling.rows.shape
    shifts = sampling.corner_shifts
    num_starts = table.shape[0] - shifts[-1]
    neighbourhoods = torch.cat([table[shift : shift + num_starts] for shift in shifts], dim=1)
    gathered = neighbourhoods.index_select(0, sampling.rows.reshape(-1))
    products = torch.bmm(gathered.view(num_bags, num_points * len(shifts), -1), grad_output.unsqueeze(-1))
    products = products.view(num_bags, num_points, len(shifts)).to(sampling.frac_x.dtype)
    return [corner.contiguous() for corner in products.unbind(-1)]


def _table_gradient(sampling: _BilinearSampling, grad_output: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(R, Cg): the gradient of the zero-bordered table, each row the weighted sum of the output gradients (B, Cg)
    of the bags that read it. The (row, bag) pairs are sorted by row once (`bincount` gives the boundaries), so each
    corner's share is one transposed bag sum over the output gradient (sparse-dense products or `embedding_bag`, as
    in the forward)."""
    rows = sampling.rows.view(-1)
    num_points = sampling.rows.shape[1]
    shifts = sampling.corner_shifts
    num_starts = num_rows - shifts[-1]  # rows + shift < table rows for every corner
    order = rows.argsort()
    bag_of_entry = (order // num_points).to(rows.dtype)  # indices and offsets of one integer type
    row_starts = F.pad(torch.bincount(rows, minlength=num_starts).cumsum(0), (1, 0)).to(rows.dtype)
    in_row_order = sampling._replace(
        frac_x=sampling.frac_x.view(-1).index_select(0, order),
        frac_y=sampling.frac_y.view(-1).index_select(0, order),
        mask=sampling.mask.view(-1).index_select(0, order),
    )
    grad_table = grad_output.new_zeros(num_rows, grad_output.shape[1])
    for shift, weight in zip(shifts, in_row_order.corner_weights(grad_output.dtype)):
        rows_of_corner = grad_table[shift : shift + num_starts]
        if _sparse_products(grad_output):
            weights = _csr(row_starts, bag_of_entry, weight, (num_starts, grad_output.shape[0]))
            torch.addmm(rows_of_corner, weights, grad_output, out=rows_of_corner)
        else:
            rows_of_corner += F.embedding_bag(
                bag_of_entry, grad_output, row_starts[:-1], mode="sum", per_sample_weights=weight
            )
    return grad_table


def _sample_backward(
    grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, spec: DCNv3Spec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (input, offset, mask) of `_sample` for `grad_output`, computed directly (the sampling positions
    are recomputed, which is cheap next to the rest): the table gradient (`_table_gradient`), and from the dot
    products of the output gradient with the corner rows (`_corner_products`) the chain rule through the bilinear
    weights to the mask and the positions (offsets)."""
    sampling = _bilinear_sampling(input, offset, mask, spec)
    batch, height, width, channels = input.shape
    group_channels = spec.group_channels
    table = _zero_bordered_table(input, group_channels)
    num_bags, num_points = sampling.rows.shape
    grad_output = grad_output.to(input.dtype).reshape(num_bags, group_channels).contiguous()
    grad_table = _table_gradient(sampling, grad_output, table.shape[0])
    grad_input = grad_table.view(batch, height + 4, width + 4, channels)[:, 2:-2, 2:-2].contiguous()

    # The products are fresh tensors: updated in place.
    top_left, top_right, bottom_left, bottom_right = _corner_products(sampling, table, grad_output)
    right_minus_left_top = top_right - top_left
    right_minus_left_bottom = bottom_right - bottom_left
    top = top_left.addcmul_(sampling.frac_x, right_minus_left_top)  # the bilinear sample's rows
    bottom_minus_top = bottom_left.addcmul_(sampling.frac_x, right_minus_left_bottom).sub_(top)
    grad_mask = top.addcmul_(sampling.frac_y, bottom_minus_top)
    scaled_mask = sampling.mask * spec.offset_scale
    grad_offset = scaled_mask.new_empty(num_bags, num_points, 2)
    torch.mul(right_minus_left_top.lerp_(right_minus_left_bottom, sampling.frac_y), scaled_mask,
              out=grad_offset[..., 0])
    torch.mul(bottom_minus_top, scaled_mask, out=grad_offset[..., 1])
    return grad_input, grad_offset.view(offset.shape).to(offset.dtype), grad_mask.view(mask.shape).to(mask.dtype)


def _backward(
    grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, spec: DCNv3Spec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (input, offset, mask) of the forward (`_sample_backward`), in chunks of images on CPU."""
    if _in_float32_on_cpu(input):
        grad_input, grad_offset, grad_mask = _backward(grad_output.float(), input.float(), offset, mask.float(), spec)
        return grad_input.to(input.dtype), grad_offset, grad_mask.to(mask.dtype)
    chunks = _image_chunks(mask)
    if len(chunks) == 1:
        return _sample_backward(grad_output, input, offset, mask, spec)
    grads = (torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask))
    for images in chunks:
        chunk_grads = _sample_backward(grad_output[images], input[images], offset[images], mask[images], spec)
        for grad, chunk_grad in zip(grads, chunk_grads):
            grad[images] = chunk_grad
    return grads


# Opaque to `torch.compile` as a custom operator: inductor's fused code for the index arithmetic is not vectorised
# on CPU and runs slower than these eager operators, so a compiled model calls them and fuses everything around.
dcnv3_pytorch_operator = register_dcnv3_operators("dcnv3_pytorch", _forward, _backward)


def run_dcnv3_pytorch(input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, spec: DCNv3Spec) -> torch.Tensor:
    """`dcnv3_core_pytorch` for a checked spec. Under `torch.export` (ONNX) the op is traced into its plain
    operators instead of the opaque custom operator."""
    if torch.compiler.is_exporting():
        return _forward(input, offset, mask, spec)
    return dcnv3_pytorch_operator(input, offset, mask, *spec)


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
    """DCNv3 core in PyTorch, differentiable w.r.t. input, offset and mask, on any device and floating dtype.

    Each output is the mask- and bilinear-weighted sum of the 4 * P corner rows of its group, gathered from a
    zero-bordered copy of the input. Positions are computed in float64 for float64 inputs and in float32 otherwise.
    """
    spec = checked_spec(
        input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
        group_channels, offset_scale, remove_center,
    )
    return run_dcnv3_pytorch(input, offset, mask, spec)


__all__ = ["dcnv3_core_pytorch", "run_dcnv3_pytorch"]
