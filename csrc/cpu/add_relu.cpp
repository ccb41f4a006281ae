// Fused add + relu: memory-bound elementwise passes, one parallel sweep each (the backward
// writes both gradients in the same sweep).
#include "add_relu.h"

namespace fusedres {

template <typename T>
void add_relu_forward(int64_t n, const T* a, const T* b, T* y) {
#pragma omp parallel for simd schedule(static) if (n > 32768)
  for (int64_t i = 0; i < n; ++i) {
    const T s = a[i] + b[i];
    y[i] = s > T(0) ? s : T(0);
  }
}

template <typename T>
void add_relu_backward(int64_t n, const T* dy, const T* y, T* da, T* db) {
  if (da && db) {
#pragma omp parallel for simd schedule(static) if (n > 32768)
    for (int64_t i = 0; i < n; ++i) {
      const T d = dy[i];  // loaded unconditionally: a select, not a branch
      const T g = y[i] > T(0) ? d : T(0);
      da[i] = g;
      db[i] = g;
    }
    return;
  }
  T* first = da ? da : db;
  if (!first) return;
#pragma omp parallel for simd schedule(static) if (n > 32768)
  for (int64_t i = 0; i < n; ++i) {
    const T d = dy[i];
    first[i] = y[i] > T(0) ? d : T(0);
  }
}

template void add_relu_forward<float>(int64_t, const float*, const float*, float*);
template void add_relu_forward<double>(int64_t, const double*, const double*, double*);
template void add_relu_backward<float>(int64_t, const float*, const float*, float*, float*);
template void add_relu_backward<double>(int64_t, const double*, const double*, double*, double*);

}  // namespace fusedres
