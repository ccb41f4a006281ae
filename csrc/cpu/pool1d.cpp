// See pool1d.h. Parallel over rows; each row's windows are visited in order, so every result
// (and the gradient sums of overlapping windows) is the same for any thread count.
#include "pool1d.h"

#include <limits>
#include <cstring>

#include "threads.h"

namespace fusedres {

namespace {

// Output j's window: [a, b) inside the row, `count` elements for the average (MXNet: the
// window clipped to the padded row, then to the row itself unless the padding counts).
struct Window {
  int64_t a, b, count;
};

inline Window window(const Pool1dShape& s, int64_t j) {
  int64_t a = j * s.stride - s.pad;
  int64_t b = a + s.K < s.L + s.pad ? a + s.K : s.L + s.pad;
  const int64_t padded = b - a;
  a = a > 0 ? a : 0;
  b = b < s.L ? b : s.L;
  return Window{a, b, s.count_include_pad ? padded : b - a};
}

inline bool worth_threads(const Pool1dShape& s) { return s.rows * s.L > 32768; }

}  // namespace

// Outputs [j0, j1) have windows inside the row (no clipping, K elements).
inline void interior(const Pool1dShape& s, int64_t* j0, int64_t* j1) {
  const int64_t Lo = s.Lout();
  const int64_t first = (s.pad + s.stride - 1) / s.stride;  // j * stride - pad >= 0
  const int64_t room = s.L - s.K + s.pad;                   // j * stride - pad + K <= L
  const int64_t last = room >= 0 ? room / s.stride + 1 : 0;
  *j0 = first < Lo ? first : Lo;
  *j1 = last < Lo ? (last > *j0 ? last : *j0) : (Lo > *j0 ? Lo : *j0);
}

template <typename T>
inline T window_out(const Pool1dShape& s, const T* xr, int64_t j) {
  const Window w = window(s, j);
  if (s.max) {
    T m = std::numeric_limits<T>::lowest();  // MXNet's start: NaN never compares greater, so it is
                                             // skipped
    for (int64_t i = w.a; i < w.b; ++i) m = xr[i] > m ? xr[i] : m;
    return m;
  }
  T sum = T(0);
  for (int64_t i = w.a; i < w.b; ++i) sum += xr[i];
  return w.count > 0 ? sum / T(w.count) : T(0);  // a window wholly past the row: 0, as MXNet
}

template <typename T>
void pool1d_forward(const Pool1dShape& s, const T* x, T* y) {
  const ThreadScope threads;
  const int64_t Lo = s.Lout(), K = s.K, S = s.stride;
  int64_t j0, j1;
  interior(s, &j0, &j1);
#pragma omp parallel for schedule(static) if (worth_threads(s))
  for (int64_t r = 0; r < s.rows; ++r) {
    const T* xr = x + r * s.L;
    T* yr = y + r * Lo;
    for (int64_t j = 0; j < j0; ++j) yr[j] = window_out(s, xr, j);
    if (s.max) {
      for (int64_t j = j0; j < j1; ++j) {
        const T* p = xr + j * S - s.pad;
        T m = std::numeric_limits<T>::lowest();
        for (int64_t k = 0; k < K; ++k) m = p[k] > m ? p[k] : m;
        yr[j] = m;
      }
    } else {
      for (int64_t j = j0; j < j1; ++j) {
        const T* p = xr + j * S - s.pad;
        T sum = T(0);
        for (int64_t k = 0; k < K; ++k) sum += p[k];
        yr[j] = sum / T(K);
      }
    }
    for (int64_t j = j1; j < Lo; ++j) yr[j] = window_out(s, xr, j);
  }
}

template <typename T>
void pool1d_backward(const Pool1dShape& s, const T* dy, const T* x, T* dx) {
  const ThreadScope threads;
  const int64_t Lo = s.Lout();
#pragma omp parallel for schedule(static) if (worth_threads(s))
  for (int64_t r = 0; r < s.rows; ++r) {
    const T* xr = x + r * s.L;
    const T* dyr = dy + r * Lo;
    T* dr = dx + r * s.L;
    std::memset(dr, 0, size_t(s.L) * sizeof(T));
    for (int64_t j = 0; j < Lo; ++j) {
      const Window w = window(s, j);
      if (w.a >= w.b) continue;
      if (s.max) {
        // The first position holding the max; the window's first when none beats the lowest value
        // (all NaN or -inf), as MXNet's oneDNN pooling routes it.
        int64_t at = w.a;
        T m = std::numeric_limits<T>::lowest();
        for (int64_t i = w.a; i < w.b; ++i)
          if (xr[i] > m) {
            m = xr[i];
            at = i;
          }
        dr[at] += dyr[j];
      } else {
        const T g = dyr[j] / T(w.count);
        for (int64_t i = w.a; i < w.b; ++i) dr[i] += g;
      }
    }
  }
}

template void pool1d_forward<float>(const Pool1dShape&, const float*, float*);
template void pool1d_forward<double>(const Pool1dShape&, const double*, double*);
template void pool1d_backward<float>(const Pool1dShape&, const float*, const float*, float*);
template void pool1d_backward<double>(const Pool1dShape&, const double*, const double*, double*);

}  // namespace fusedres
