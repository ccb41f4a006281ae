// Fused add + relu on the GPU: y = relu(a + b) (NaN kept, as MXNet's relu) and its backward,
// elementwise over n values.
// Grid-stride loops; 16-byte vector accesses when every pointer is 16-byte aligned (decided
// in the kernel, uniformly for the whole grid), then a scalar tail.
#include "common.cuh"

namespace fusedres {
namespace {

typedef unsigned long long u64;

template <typename T>
struct alignas(16) Vec {  // 16 bytes of T, moved with one 128-bit load or store
  static constexpr int n = 16 / sizeof(T);
  T v[n];
};

template <typename T>
__device__ __forceinline__ Vec<T> load16(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const Vec<T>& r) {
  *reinterpret_cast<Vec<T>*>(p) = r;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<u64>(p) & 15u) == 0;
}

template <typename T>
__device__ void add_relu_fwd(long long n, const T* __restrict__ a, const T* __restrict__ b,
                             T* __restrict__ y) {
  constexpr int V = Vec<T>::n;
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long step = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (aligned16(a) && aligned16(b) && aligned16(y)) {
    const long long nvec = n / V;
    for (long long i = tid; i < nvec; i += step) {
      const Vec<T> va = load16(a + i * V), vb = load16(b + i * V);
      Vec<T> vy;
#pragma unroll
      for (int j = 0; j < V; ++j) vy.v[j] = from_f<T>(relu(to_f(va.v[j]) + to_f(vb.v[j])));
      store16(y + i * V, vy);
    }
    done = nvec * V;
  }
  for (long long i = done + tid; i < n; i += step) y[i] = from_f<T>(relu(to_f(a[i]) + to_f(b[i])));
}

// da = db = dy * relu'(y) (relu' = NaN at NaN, common.cuh); a null da or db is not written.
template <typename T>
__device__ void add_relu_bwd(long long n, const T* __restrict__ dy, const T* __restrict__ y,
                             T* __restrict__ da, T* __restrict__ db) {
  constexpr int V = Vec<T>::n;
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  const long long step = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (aligned16(dy) && aligned16(y) && aligned16(da) && aligned16(db)) {  // null is aligned
    const long long nvec = n / V;
    for (long long i = tid; i < nvec; i += step) {
      const Vec<T> vg = load16(dy + i * V), vy = load16(y + i * V);
      Vec<T> r;
#pragma unroll
      for (int j = 0; j < V; ++j) r.v[j] = from_f<T>(relu_grad(to_f(vg.v[j]), to_f(vy.v[j])));
      if (da) store16(da + i * V, r);
      if (db) store16(db + i * V, r);
    }
    done = nvec * V;
  }
  for (long long i = done + tid; i < n; i += step) {
    const T g = from_f<T>(relu_grad(to_f(dy[i]), to_f(y[i])));
    if (da) da[i] = g;
    if (db) db[i] = g;
  }
}

}  // namespace
}  // namespace fusedres

#define FUSEDRES_ADD_RELU(SUFFIX, T)                                                          \
  extern "C" __global__ void add_relu_forward_##SUFFIX(long long n, const T* a, const T* b,   \
                                                       T* y) {                                \
    fusedres::add_relu_fwd<T>(n, a, b, y);                                                    \
  }                                                                                           \
  extern "C" __global__ void add_relu_backward_##SUFFIX(long long n, const T* dy, const T* y, \
                                                        T* da, T* db) {                       \
    fusedres::add_relu_bwd<T>(n, dy, y, da, db);                                              \
  }

FUSEDRES_ADD_RELU(f32, float)
FUSEDRES_ADD_RELU(f16, __half)
