// Runs the DCNv3 CUDA kernels on the host, to test their indexing and reductions without a GPU.
//
// The test extracts the "DEVICE CODE" region of csrc/dcnv3_cuda.cu into device_code.inc and compiles this file with
// `g++ -std=c++20 -pthread`. Each CUDA block runs as `threads_per_block` std::threads; warp shuffles exchange
// values through a block-wide barrier (so a kernel whose threads disagree on the number of shuffles deadlocks,
// as it would misbehave on a GPU) and atomicAdd is std::atomic_ref::fetch_add.
//
// Usage: host_emulation IN OUT float|double. IN holds int64 [N, H, W, Ho, Wo, group, group_channels, kernel_h,
// kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, remove_center, blocks, threads_per_block],
// float64 offset_scale, then float64 input, offset, mask and grad_output. OUT receives float64 output,
// grad_input, grad_offset and grad_mask.

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

struct Dim3 {
  unsigned x;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

namespace at {
template <typename T>
using opmath_type = T;
}

std::barrier<>* block_barrier;
std::vector<double> shuffle_slots;

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  shuffle_slots[threadIdx.x] = value;
  block_barrier->arrive_and_wait();
  const T other = static_cast<T>(shuffle_slots[threadIdx.x ^ lane_mask]);
  block_barrier->arrive_and_wait();
  return other;
}

template <typename T>
void atomicAdd(T* address, T value) {
  std::atomic_ref<T>(*address).fetch_add(value);
}

namespace {
#include "device_code.inc"
}

template <typename Kernel>
void launch(unsigned blocks, unsigned threads_per_block, Kernel kernel) {
  gridDim.x = blocks;
  blockDim.x = threads_per_block;
  shuffle_slots.assign(threads_per_block, 0);
  for (unsigned block = 0; block < blocks; ++block) {
    std::barrier<> barrier(threads_per_block);
    block_barrier = &barrier;
    std::vector<std::thread> threads;
    for (unsigned thread = 0; thread < threads_per_block; ++thread) {
      threads.emplace_back([&, block, thread] {
        blockIdx.x = block;
        threadIdx.x = thread;
        kernel();
      });
    }
    for (auto& thread : threads) {
      thread.join();
    }
  }
}

template <typename T>
std::vector<T> read_array(std::ifstream& in, int64_t size) {
  std::vector<double> values(size);
  in.read(reinterpret_cast<char*>(values.data()), size * sizeof(double));
  return std::vector<T>(values.begin(), values.end());
}

template <typename T>
void write_array(std::ofstream& out, const std::vector<T>& values) {
  for (const T value : values) {
    const double as_double = value;
    out.write(reinterpret_cast<const char*>(&as_double), sizeof(double));
  }
}

template <typename T>
void run(const std::string& in_path, const std::string& out_path) {
  std::ifstream in(in_path, std::ios::binary);
  int64_t m[18];
  double offset_scale;
  in.read(reinterpret_cast<char*>(m), sizeof(m));
  in.read(reinterpret_cast<char*>(&offset_scale), sizeof(offset_scale));
  const int64_t batch = m[0], height = m[1], width = m[2], height_out = m[3], width_out = m[4], group = m[5];
  const int64_t group_channels = m[6], kernel_h = m[7], kernel_w = m[8], remove_center = m[15];
  const int64_t num_points = kernel_h * kernel_w - remove_center, channels = group * group_channels;
  const Geometry geo{height, width, channels, height_out, width_out, group, group_channels, num_points, kernel_h,
                     m[9], m[10], m[11], m[12], m[13], m[14], m[13] * (kernel_h - 1) / 2, m[14] * (kernel_w - 1) / 2,
                     remove_center ? (kernel_h * kernel_w - 1) / 2 : kernel_h * kernel_w};
  const int64_t pixels_out = batch * height_out * width_out;
  const auto input = read_array<T>(in, batch * height * width * channels);
  const auto offset = read_array<T>(in, pixels_out * group * num_points * 2);
  const auto mask = read_array<T>(in, pixels_out * group * num_points);
  const auto grad_output = read_array<T>(in, pixels_out * channels);
  std::vector<T> output(pixels_out * channels), grad_input(input.size(), 0), grad_offset(offset.size());
  std::vector<T> grad_mask(mask.size());
  const unsigned blocks = m[16], threads_per_block = m[17];
  launch(blocks, threads_per_block, [&] {
    dcnv3_forward_kernel<T>(input.data(), offset.data(), mask.data(), output.data(), geo, T(offset_scale),
                            pixels_out * group * forward_slots(group_channels));
  });
  const int lanes = lanes_per_group(group_channels);
  launch(blocks, threads_per_block, [&] {
    dcnv3_backward_kernel<T>(grad_output.data(), input.data(), offset.data(), mask.data(), grad_input.data(),
                             grad_offset.data(), grad_mask.data(), geo, T(offset_scale), pixels_out * group, lanes);
  });
  std::ofstream out(out_path, std::ios::binary);
  write_array(out, output);
  write_array(out, grad_input);
  write_array(out, grad_offset);
  write_array(out, grad_mask);
}

int main(int argc, char** argv) {
  if (argc != 4) {
    return 2;
  }
  if (std::string(argv[3]) == "double") {
    run<double>(argv[1], argv[2]);
  } else {
    run<float>(argv[1], argv[2]);
  }
  return 0;
}
