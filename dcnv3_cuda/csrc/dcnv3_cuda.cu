// DCNv3 core operator of InternImage on CUDA tensors: forward and backward kernels, registered as the PyTorch
// operators torch.ops.dcnv3_cuda.forward and torch.ops.dcnv3_cuda.backward (the Python package adds the fake
// tensor and autograd registrations).
//
// Layouts (contiguous): input (N, H, W, G * Cg), offset (N, Ho, Wo, G * P * 2) holding (dx, dy) pixel pairs,
// mask (N, Ho, Wo, G * P), output (N, Ho, Wo, G * Cg). The P points of a group walk the kernel taps x-outer,
// y-inner (tap = tap_x * kernel_h + tap_y) and skip the centre tap (kernel_h * kernel_w - 1) / 2 when
// remove_center is set. Point p of output pixel (row, col) samples the input at
//   x = half_w - pad_w + col * stride_w + offset_scale * (tap_x * dilation_w - half_w + dx),
//   half_w = dilation_w * (kernel_w - 1) / 2   (y likewise),
// bilinearly, with zeros outside the image. Arithmetic runs in at::opmath_type<scalar_t> (float for half,
// bfloat16 and float; double for double); flat indices are 64-bit.
//
// Non-finite values follow the official grid_sample formulation (not the official CUDA kernel, which skips a point
// at a NaN position): a NaN or infinite position makes the point's sample NaN, a NaN or infinite mask value or
// pixel the products it takes part in, and no pixel outside a point's four corners is ever read.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace {

// BEGIN DEVICE CODE: tests/test_dcnv3_cuda.py also compiles this region for the host, with one std::thread per
// CUDA thread, to check the kernels without a GPU (dcnv3_cuda/emulation/host_emulation.cpp).
constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
// Channels each thread handles, so that one computation of a sampling position serves several channels.
constexpr int kChannelsPerThread = 4;

// Sizes and hyper-parameters of one call, passed to the kernels by value.
struct Geometry {
  int64_t height, width, channels, height_out, width_out, group, group_channels, num_points;
  int64_t kernel_h, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, half_h, half_w, skipped_tap;
};

__device__ __forceinline__ float floor_op(float value) { return floorf(value); }
__device__ __forceinline__ double floor_op(double value) { return floor(value); }

// Bilinear footprint of one sampling position: the four corners (x0, y0), (x0 + 1, y0), (x0, y0 + 1),
// (x0 + 1, y0 + 1) as element offsets into the (H, W, C) image, their bilinear weights, and whether each is inside
// the image (only those are read; the others count as zero). A NaN or infinite position has NaN fractions and
// weights (inf - inf) and no corner inside, so its sample is NaN.
template <typename opmath_t>
struct Footprint {
  opmath_t frac_x, frac_y;
  int64_t corner_offset[4];
  opmath_t corner_weight[4];
  bool corner_inside[4];
};

// Footprint of point `point` of output pixel (row, col), whose learned offset is (dx, dy).
template <typename opmath_t>
__device__ __forceinline__ Footprint<opmath_t> sampling_footprint(
    const Geometry& geo, int64_t row, int64_t col, int point, opmath_t dx, opmath_t dy, opmath_t offset_scale) {
  // Tap arithmetic in 32 bits (cheaper division than 64 bits); kernel sizes are small.
  const int tap = point >= geo.skipped_tap ? point + 1 : point;
  const int kernel_h = static_cast<int>(geo.kernel_h);
  const opmath_t tap_x = static_cast<opmath_t>((tap / kernel_h) * geo.dilation_w - geo.half_w);
  const opmath_t tap_y = static_cast<opmath_t>((tap % kernel_h) * geo.dilation_h - geo.half_h);
  const opmath_t x = static_cast<opmath_t>(geo.half_w - geo.pad_w + col * geo.stride_w) + offset_scale * (tap_x + dx);
  const opmath_t y = static_cast<opmath_t>(geo.half_h - geo.pad_h + row * geo.stride_h) + offset_scale * (tap_y + dy);
  Footprint<opmath_t> footprint;
  const opmath_t x_floor = floor_op(x);
  const opmath_t y_floor = floor_op(y);
  footprint.frac_x = x - x_floor;
  footprint.frac_y = y - y_floor;
  // Only a position with a corner in the image is cast to integers (so the cast is always defined, NaN and inf
  // included); the corners of any other lie at (-2, -2) and (-1, -1), outside.
  const bool touches_image = x > -1 && y > -1 && x < geo.width && y < geo.height;
  const int64_t x0 = touches_image ? static_cast<int64_t>(x_floor) : -2;
  const int64_t y0 = touches_image ? static_cast<int64_t>(y_floor) : -2;
#pragma unroll
  for (int corner = 0; corner < 4; ++corner) {
    const int64_t corner_x = x0 + (corner & 1);
    const int64_t corner_y = y0 + (corner >> 1);
    const opmath_t weight_x = (corner & 1) ? footprint.frac_x : 1 - footprint.frac_x;
    const opmath_t weight_y = (corner >> 1) ? footprint.frac_y : 1 - footprint.frac_y;
    const bool inside = corner_x >= 0 && corner_x < geo.width && corner_y >= 0 && corner_y < geo.height;
    footprint.corner_inside[corner] = inside;
    footprint.corner_weight[corner] = weight_x * weight_y;
    footprint.corner_offset[corner] = inside ? (corner_y * geo.width + corner_x) * geo.channels : 0;
  }
  return footprint;
}

// Threads of one (n, row, col, g) in the forward kernel: each sums at most kChannelsPerThread channels.
__host__ __device__ __forceinline__ int64_t forward_slots(int64_t group_channels) {
  return (group_channels + kChannelsPerThread - 1) / kChannelsPerThread;
}

// One thread per (n, row, col, g) and channel slot s: it computes the mask-weighted sum of the P bilinear samples
// for channels s, s + slots, s + 2 * slots, ... of its group (neighbouring threads read neighbouring channels).
template <typename scalar_t>
__global__ void dcnv3_forward_kernel(
    const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
    scalar_t* __restrict__ output, const Geometry geo, const at::opmath_type<scalar_t> offset_scale,
    const int64_t num_threads) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t slots = forward_slots(geo.group_channels);
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < num_threads;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t slot = index % slots;
    const int64_t pixel_group = index / slots;  // flat (n, row, col, g)
    const int64_t g = pixel_group % geo.group;
    const int64_t pixel = pixel_group / geo.group;  // flat (n, row, col)
    const int64_t col = pixel % geo.width_out;
    const int64_t row = (pixel / geo.width_out) % geo.height_out;
    const int64_t n = pixel / (geo.width_out * geo.height_out);
    const scalar_t* image = input + n * geo.height * geo.width * geo.channels + g * geo.group_channels + slot;
    const scalar_t* point_offset = offset + pixel_group * geo.num_points * 2;
    const scalar_t* point_mask = mask + pixel_group * geo.num_points;
    bool has_channel[kChannelsPerThread];
    opmath_t sum[kChannelsPerThread];
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      has_channel[k] = slot + k * slots < geo.group_channels;
      sum[k] = 0;
    }
    for (int point = 0; point < geo.num_points; ++point) {
      const auto footprint = sampling_footprint<opmath_t>(
          geo, row, col, point, static_cast<opmath_t>(point_offset[2 * point]),
          static_cast<opmath_t>(point_offset[2 * point + 1]), offset_scale);
      const opmath_t weight = static_cast<opmath_t>(point_mask[point]);
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        // A corner outside the image adds weight * 0: zero, or NaN where a weight is NaN or infinite.
        const opmath_t corner_weight = footprint.corner_weight[corner] * weight;
        const bool inside = footprint.corner_inside[corner];
        const scalar_t* corner_image = image + footprint.corner_offset[corner];
#pragma unroll
        for (int k = 0; k < kChannelsPerThread; ++k) {
          if (has_channel[k]) {
            sum[k] += corner_weight * (inside ? static_cast<opmath_t>(corner_image[k * slots]) : opmath_t(0));
          }
        }
      }
    }
    scalar_t* pixel_output = output + pixel_group * geo.group_channels + slot;
#pragma unroll
    for (int k = 0; k < kChannelsPerThread; ++k) {
      if (has_channel[k]) {
        pixel_output[k * slots] = static_cast<scalar_t>(sum[k]);
      }
    }
  }
}

// `lanes` consecutive threads (a power of two <= 32) share one (n, row, col, g) and split its Cg channels. For each
// point they scatter grad_input with atomics and reduce the offset and mask gradients over the channels with warp
// shuffles. Every thread of a block runs the same number of outer iterations, so the shuffles see full warps.
template <typename scalar_t>
__global__ void dcnv3_backward_kernel(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
    const scalar_t* __restrict__ mask, at::opmath_type<scalar_t>* __restrict__ grad_input,
    scalar_t* __restrict__ grad_offset, scalar_t* __restrict__ grad_mask, const Geometry geo,
    const at::opmath_type<scalar_t> offset_scale, const int64_t num_pixel_groups, const int lanes) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % lanes;
  const int64_t groups_per_block = blockDim.x / lanes;
  for (int64_t first = blockIdx.x * groups_per_block; first < num_pixel_groups;
       first += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    const int64_t pixel_group = first + threadIdx.x / lanes;  // flat (n, row, col, g)
    const bool active = pixel_group < num_pixel_groups;
    const int64_t g = pixel_group % geo.group;
    const int64_t pixel = pixel_group / geo.group;
    const int64_t col = pixel % geo.width_out;
    const int64_t row = (pixel / geo.width_out) % geo.height_out;
    const int64_t n = pixel / (geo.width_out * geo.height_out);
    const int64_t image_start = n * geo.height * geo.width * geo.channels + g * geo.group_channels;
    for (int point = 0; point < geo.num_points; ++point) {
      opmath_t grad_x = 0, grad_y = 0, grad_weight = 0;
      if (active) {
        const int64_t point_index = pixel_group * geo.num_points + point;
        const auto footprint = sampling_footprint<opmath_t>(
            geo, row, col, point, static_cast<opmath_t>(offset[2 * point_index]),
            static_cast<opmath_t>(offset[2 * point_index + 1]), offset_scale);
        const opmath_t weight = static_cast<opmath_t>(mask[point_index]);
        for (int64_t channel = lane; channel < geo.group_channels; channel += lanes) {
          const opmath_t grad = static_cast<opmath_t>(grad_output[pixel_group * geo.group_channels + channel]);
          opmath_t value[4];
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
            const int64_t element = image_start + footprint.corner_offset[corner] + channel;
            value[corner] = footprint.corner_inside[corner] ? static_cast<opmath_t>(input[element]) : opmath_t(0);
            if (footprint.corner_inside[corner]) {
              atomicAdd(grad_input + element, grad * weight * footprint.corner_weight[corner]);
            }
          }
          const opmath_t sample = footprint.corner_weight[0] * value[0] + footprint.corner_weight[1] * value[1] +
                                  footprint.corner_weight[2] * value[2] + footprint.corner_weight[3] * value[3];
          const opmath_t d_sample_dx =
              (1 - footprint.frac_y) * (value[1] - value[0]) + footprint.frac_y * (value[3] - value[2]);
          const opmath_t d_sample_dy =
              (1 - footprint.frac_x) * (value[2] - value[0]) + footprint.frac_x * (value[3] - value[1]);
          grad_weight += grad * sample;
          grad_x += grad * weight * d_sample_dx;
          grad_y += grad * weight * d_sample_dy;
        }
      }
      for (int stride = lanes / 2; stride > 0; stride /= 2) {
        grad_x += __shfl_xor_sync(0xffffffff, grad_x, stride);
        grad_y += __shfl_xor_sync(0xffffffff, grad_y, stride);
        grad_weight += __shfl_xor_sync(0xffffffff, grad_weight, stride);
      }
      if (active && lane == 0) {
        const int64_t point_index = pixel_group * geo.num_points + point;
        grad_offset[2 * point_index] = static_cast<scalar_t>(offset_scale * grad_x);
        grad_offset[2 * point_index + 1] = static_cast<scalar_t>(offset_scale * grad_y);
        grad_mask[point_index] = static_cast<scalar_t>(grad_weight);
      }
    }
  }
}

// Threads sharing one (n, row, col, g) in the backward kernel: a power of two, at most a warp, that gives each
// about kChannelsPerThread channels.
int lanes_per_group(int64_t group_channels) {
  int lanes = 1;
  while (lanes * kChannelsPerThread < group_channels && lanes < kWarpSize) {
    lanes *= 2;
  }
  return lanes;
}

// END DEVICE CODE

int64_t output_size(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  return (size + 2 * pad - (dilation * (kernel - 1) + 1)) / stride + 1;
}

// Checks every argument against the others and returns the call's geometry.
Geometry make_geometry(
    const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, int64_t kernel_h, int64_t kernel_w,
    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
    int64_t group, int64_t group_channels, int64_t remove_center) {
  TORCH_CHECK(
      kernel_h > 0 && kernel_w > 0 && stride_h > 0 && stride_w > 0 && dilation_h > 0 && dilation_w > 0,
      "dcnv3_cuda: kernel, stride and dilation must be positive");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "dcnv3_cuda: padding must be non-negative");
  TORCH_CHECK(group > 0 && group_channels > 0, "dcnv3_cuda: group and group_channels must be positive");
  TORCH_CHECK(input.dim() == 4, "dcnv3_cuda: input must be (N, H, W, group * group_channels), got ", input.sizes());
  TORCH_CHECK(
      input.size(3) == group * group_channels, "dcnv3_cuda: input has ", input.size(3),
      " channels, expected group * group_channels = ", group * group_channels);
  TORCH_CHECK(
      input.is_cuda() && offset.device() == input.device() && mask.device() == input.device(),
      "dcnv3_cuda: input, offset and mask must be CUDA tensors on one device");
  TORCH_CHECK(
      offset.scalar_type() == input.scalar_type() && mask.scalar_type() == input.scalar_type(),
      "dcnv3_cuda: input, offset and mask must have one dtype, got ", input.scalar_type(), ", ",
      offset.scalar_type(), ", ", mask.scalar_type());
  Geometry geo;
  geo.height = input.size(1);
  geo.width = input.size(2);
  geo.channels = input.size(3);
  geo.height_out = output_size(geo.height, kernel_h, stride_h, pad_h, dilation_h);
  geo.width_out = output_size(geo.width, kernel_w, stride_w, pad_w, dilation_w);
  TORCH_CHECK(
      geo.height_out > 0 && geo.width_out > 0, "dcnv3_cuda: the input ", input.sizes(),
      " is smaller than the dilated kernel");
  geo.group = group;
  geo.group_channels = group_channels;
  geo.num_points = kernel_h * kernel_w - (remove_center ? 1 : 0);
  geo.kernel_h = kernel_h;
  geo.stride_h = stride_h;
  geo.stride_w = stride_w;
  geo.pad_h = pad_h;
  geo.pad_w = pad_w;
  geo.dilation_h = dilation_h;
  geo.dilation_w = dilation_w;
  geo.half_h = dilation_h * (kernel_h - 1) / 2;
  geo.half_w = dilation_w * (kernel_w - 1) / 2;
  geo.skipped_tap = remove_center ? (kernel_h * kernel_w - 1) / 2 : kernel_h * kernel_w;
  const std::vector<int64_t> offset_shape{input.size(0), geo.height_out, geo.width_out, group * geo.num_points * 2};
  const std::vector<int64_t> mask_shape{input.size(0), geo.height_out, geo.width_out, group * geo.num_points};
  TORCH_CHECK(offset.sizes() == offset_shape, "dcnv3_cuda: offset must be ", offset_shape, ", got ", offset.sizes());
  TORCH_CHECK(mask.sizes() == mask_shape, "dcnv3_cuda: mask must be ", mask_shape, ", got ", mask.sizes());
  return geo;
}

// Enough blocks to cover `work` threads, capped so the grid-stride loops take over on huge inputs.
int64_t grid_size(int64_t work, int64_t threads_per_item = 1) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 64;
  return std::max<int64_t>(1, std::min<int64_t>((work * threads_per_item + kThreadsPerBlock - 1) / kThreadsPerBlock,
                                                max_blocks));
}

at::Tensor dcnv3_forward(
    const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask, int64_t kernel_h, int64_t kernel_w,
    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
    int64_t group, int64_t group_channels, double offset_scale, int64_t remove_center) {
  const Geometry geo = make_geometry(
      input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
      group_channels, remove_center);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor input_c = input.contiguous(), offset_c = offset.contiguous(), mask_c = mask.contiguous();
  at::Tensor output = at::empty({input.size(0), geo.height_out, geo.width_out, geo.channels}, input.options());
  const int64_t num_pixel_groups = input.size(0) * geo.height_out * geo.width_out * geo.group;
  const int64_t num_threads = num_pixel_groups * forward_slots(group_channels);
  if (num_threads == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_cuda_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    dcnv3_forward_kernel<scalar_t><<<grid_size(num_threads), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        input_c.data_ptr<scalar_t>(), offset_c.data_ptr<scalar_t>(), mask_c.data_ptr<scalar_t>(),
        output.data_ptr<scalar_t>(), geo, static_cast<opmath_t>(offset_scale), num_threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dcnv3_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
    int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t group, int64_t group_channels, double offset_scale,
    int64_t remove_center) {
  const Geometry geo = make_geometry(
      input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
      group_channels, remove_center);
  const std::vector<int64_t> output_shape{input.size(0), geo.height_out, geo.width_out, geo.channels};
  TORCH_CHECK(
      grad_output.sizes() == output_shape && grad_output.scalar_type() == input.scalar_type() &&
          grad_output.device() == input.device(),
      "dcnv3_cuda: grad_output must be ", output_shape, " with the input's dtype and device, got ",
      grad_output.sizes(), " ", grad_output.scalar_type());
  // grad_input is summed with atomics, so its last bits depend on thread scheduling.
  at::globalContext().alertNotDeterministic("dcnv3_cuda::backward");
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor grad_output_c = grad_output.contiguous(), input_c = input.contiguous();
  const at::Tensor offset_c = offset.contiguous(), mask_c = mask.contiguous();
  // grad_input is accumulated with atomics in the op-math type (float for half and bfloat16) and cast at the end.
  at::Tensor grad_input = at::zeros(input.sizes(), input.options().dtype(at::toOpMathType(input.scalar_type())));
  at::Tensor grad_offset = at::empty_like(offset_c);
  at::Tensor grad_mask = at::empty_like(mask_c);
  const int64_t num_pixel_groups = input.size(0) * geo.height_out * geo.width_out * geo.group;
  if (num_pixel_groups > 0) {
    const int lanes = lanes_per_group(geo.group_channels);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dcnv3_cuda_backward", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      dcnv3_backward_kernel<scalar_t>
          <<<grid_size(num_pixel_groups, lanes), kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
              grad_output_c.data_ptr<scalar_t>(), input_c.data_ptr<scalar_t>(), offset_c.data_ptr<scalar_t>(),
              mask_c.data_ptr<scalar_t>(), grad_input.data_ptr<opmath_t>(), grad_offset.data_ptr<scalar_t>(),
              grad_mask.data_ptr<scalar_t>(), geo, static_cast<opmath_t>(offset_scale), num_pixel_groups, lanes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_input.to(input.scalar_type()), grad_offset, grad_mask};
}

}  // namespace

TORCH_LIBRARY(dcnv3_cuda, m) {
  m.def(
      "forward(Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, int stride_h, int stride_w, "
      "int pad_h, int pad_w, int dilation_h, int dilation_w, int group, int group_channels, float offset_scale, "
      "int remove_center) -> Tensor");
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, int kernel_h, int kernel_w, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int group, "
      "int group_channels, float offset_scale, int remove_center) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dcnv3_cuda, CUDA, m) {
  m.impl("forward", &dcnv3_forward);
  m.impl("backward", &dcnv3_backward);
}

// `from . import _C` loads this library (and so runs the registrations above); it defines no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
