// Shared device helpers for the fusedres CUDA kernels: dtype conversion, the relu and the
// batchnorm affine that forward and backward must compute identically, and block reductions.
// Compiled by NVRTC (tools/build_cubins.py, or CuPy at run time), so only CUDA headers here.
#pragma once
#include <cuda_fp16.h>

namespace fusedres {

// Every kernel computes in float and converts only at loads and stores.
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}

// MXNet's relu (mshadow_op::relu): isnan(v) ? v : (v > 0 ? v : 0), so NaN passes through.
__device__ __forceinline__ float relu(float v) { return isnan(v) || v > 0.f ? v : 0.f; }
// MXNet's relu gradient, dy * relu'(pre) with relu' = 1 above 0, 0 at or below, NaN at NaN: a
// product, so a NaN or infinite dy reaches the gradient where the relu is closed too.
__device__ __forceinline__ float relu_grad(float dy, float pre) {
  return __fmul_rn(dy, pre > 0.f ? 1.f : (isnan(pre) ? pre : 0.f));
}
// The op's optional relu (relu=False gives conv + batchnorm alone), and the gradient reaching
// the pre-activation, from the same pre-activation value as the forward.
__device__ __forceinline__ float act(float v, int do_relu) { return do_relu ? relu(v) : v; }
__device__ __forceinline__ float act_grad(float dy, float pre, int do_relu) {
  return do_relu ? relu_grad(dy, pre) : dy;
}

// Per-channel normalization in BatchNorm's own order, pre = (z - mean) * a + beta with
// a = gamma * invstd (the CPU bn_pre). The folded z * a + (beta - mean * a) would turn an
// infinite a into inf - inf = NaN. Explicit rounding intrinsics stop the compiler from
// contracting differently in different kernels, so the forward output and the backward relu
// mask agree bit for bit.
struct Affine {
  float mean, a, beta;
  __device__ __forceinline__ float pre(float z) const {
    return __fmaf_rn(__fsub_rn(z, mean), a, beta);
  }
};
__device__ __forceinline__ Affine bn_affine(float gamma, float beta, float mean, float invstd) {
  Affine r;
  r.mean = mean;
  r.a = __fmul_rn(gamma, invstd);
  r.beta = beta;
  return r;
}

// Sum over the block in a fixed tree (deterministic). blockDim.x must be a multiple of 32 and
// at most 1024; every thread must call it. The result is valid in every thread.
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A warp_part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // warp_part may still be read by a previous call
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  A t = lane < nwarps ? warp_part[lane] : A(0);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}

}  // namespace fusedres
