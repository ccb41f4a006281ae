// Fused add + relu on the CPU: y = relu(a + b), elementwise over n contiguous values.
#pragma once
#include <cstdint>

namespace fusedres {

template <typename T>
void add_relu_forward(int64_t n, const T* a, const T* b, T* y);

// da = db = dy * relu'(y), relu'(NaN) = NaN. Either gradient pointer may be null; when both are
// wanted the second is a copy of the first.
template <typename T>
void add_relu_backward(int64_t n, const T* dy, const T* y, T* da, T* db);

}  // namespace fusedres
