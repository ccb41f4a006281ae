// 1-D max and average pooling over rows of NCW data, as MXNet's Pooling computes them (its
// pool_enum::kValid / kFull output widths, the windows clipped to the padded row, average with
// or without the padding in the count, max that skips NaN and starts from the lowest finite value,
// the gradient of a max to the first position holding it). MXNet runs 1-D pooling through oneDNN on
// plain NCW arrays, which is slow there (about 7-10 ms for (16, 64, 512), 2 threads: the stem's
// pooling in a 1-D ResNet takes longer than its conv); this is one pass over the rows.
#pragma once
#include <cstdint>

namespace fusedres {

struct Pool1dShape {
  int64_t rows, L;         // data (rows, L): N * C rows
  int64_t K, stride, pad;  // kernel, stride, pad (both sides)
  bool full = false;       // pooling_convention 'full' (ceil) instead of 'valid' (floor)
  bool max = true;         // else average
  bool count_include_pad = true;
  int64_t Lout() const {
    const int64_t span = L + 2 * pad - K;  // >= 0 (checked by the callers)
    return 1 + (full ? (span + stride - 1) / stride : span / stride);
  }
};

template <typename T>
void pool1d_forward(const Pool1dShape& s, const T* x, T* y);

// dx (rows, L) is overwritten with the gradient; x is read for a max's positions.
template <typename T>
void pool1d_backward(const Pool1dShape& s, const T* dy, const T* x, T* dx);

}  // namespace fusedres
