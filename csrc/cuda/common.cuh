// Shared device helpers for the fusedres CUDA kernels: dtype conversion, the relu and the
// batchnorm affine that forward and backward must compute identically, and block reductions.
// Compiled by NVRTC (tools/build_cubins.py, or CuPy at run time), so only CUDA headers here.
#pragma once
#include <cuda_fp16.h>

namespace fusedres {

// Every kernel computes in float and converts only at loads and stores.
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// std::max(v, 0) as the CPU kernels write it: NaN propagates.
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }
// The op's optional relu (relu=False gives conv + batchnorm alone), and the backward mask
// that goes with it, decided from the same pre-activation value as the forward.
__device__ __forceinline__ float act(float v, int do_relu) { return do_relu ? relu(v) : v; }
__device__ __forceinline__ bool passes(float pre, int do_relu) { return !do_relu || pre > 0.f; }

// Per-channel affine of the normalization, y = relu(z * a + b), with a = gamma * invstd and
// b = beta - mean * a (the CPU bn_affine). Explicit rounding intrinsics stop the compiler from
// contracting differently in different kernels, so the forward output and the backward relu
// mask agree bit for bit.
struct Affine {
  float a, b;
  __device__ __forceinline__ float pre(float z) const { return __fmaf_rn(z, a, b); }
};
__device__ __forceinline__ Affine bn_affine(float gamma, float beta, float mean, float invstd) {
  Affine r;
  r.a = __fmul_rn(gamma, invstd);
  r.b = __fmaf_rn(-mean, r.a, beta);
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
