// The conv1d_bn_relu op's attributes and their checks: the C++ mirror of fusedres/attrs.py
// (same names, defaults, limits and messages), used by the MXNet op library (csrc/mxop) and the
// pybind11 module (csrc/bindings.cpp). Each message names the attribute or the input at fault.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/conv1d_bn_relu.h"

namespace fusedres {

// Largest value of any hyper-parameter, dimension or tensor size: MXNet 1.9.1's wheels index
// tensors with 32-bit integers (built with MSHADOW_INT64_TENSOR_SIZE=0), as Convolution's own
// int attributes are.
constexpr int64_t kMaxExtent = 2147483647;

struct ConvAttrs {
  int64_t num_filter = 0, kernel = 0, stride = 1, pad = 0, dilate = 1, num_group = 1;
  bool no_bias = false, use_global_stats = false, relu = true;
  double eps = 1e-5, momentum = 0.9;
};

// A double as Python's repr writes it (1.5, 0.0, 1e-05, nan), so that messages match
// fusedres/attrs.py's.
inline std::string num_str(double v) {
  std::string s;
  for (int digits = 1; digits <= 17; ++digits) {  // the shortest form that reads back as v
    char b[32];
    std::snprintf(b, sizeof(b), "%.*g", digits, v);
    s = b;
    if (std::isnan(v) || std::strtod(b, nullptr) == v) break;
  }
  if (s.find_first_not_of("-0123456789") == std::string::npos) s += ".0";  // 0 -> 0.0
  return s;
}

inline std::string conv_int_error(const char* name, int64_t v, int64_t lo) {
  if (v < lo)
    return std::string(name) + " must be >= " + std::to_string(lo) + ", got " + std::to_string(v);
  if (v > kMaxExtent)
    return std::string(name) + " must be <= " + std::to_string(kMaxExtent) + ", got " +
           std::to_string(v);
  return "";
}

// The attributes on their own; "" when valid.
inline std::string check_conv_attrs(const ConvAttrs& a) {
  std::string e;
  if (!(e = conv_int_error("num_filter", a.num_filter, 1)).empty()) return e;
  if (!(e = conv_int_error("kernel", a.kernel, 1)).empty()) return e;
  if (!(e = conv_int_error("stride", a.stride, 1)).empty()) return e;
  if (!(e = conv_int_error("pad", a.pad, 0)).empty()) return e;
  if (!(e = conv_int_error("dilate", a.dilate, 1)).empty()) return e;
  if (!(e = conv_int_error("num_group", a.num_group, 1)).empty()) return e;
  if (!(std::isfinite(a.eps) && a.eps > 0))
    return "eps must be a finite number > 0, got " + num_str(a.eps);
  if (!(a.momentum >= 0 && a.momentum <= 1))
    return "momentum must be in [0, 1], got " + num_str(a.momentum);
  if (a.num_filter % a.num_group)
    return "num_group (" + std::to_string(a.num_group) + ") must divide num_filter (" +
           std::to_string(a.num_filter) + ")";
  return "";
}

inline int64_t conv_out_width(const ConvAttrs& a, int64_t width) {
  return (width + 2 * a.pad - a.dilate * (a.kernel - 1) - 1) / a.stride + 1;
}

// data (n, c, width) against valid attributes; "" when the op can run on it.
inline std::string check_conv_data(const ConvAttrs& a, int64_t n, int64_t c, int64_t width) {
  const std::string shape =
      "(" + std::to_string(n) + ", " + std::to_string(c) + ", " + std::to_string(width) + ")";
  if (n < 1 || c < 1 || width < 1)
    return "data must have no zero-size dimension, got shape " + shape;
  if (n > kMaxExtent / c || n * c > kMaxExtent / width)
    return "data has more than " + std::to_string(kMaxExtent) + " elements: shape " + shape;
  if (c % a.num_group)
    return "num_group (" + std::to_string(a.num_group) + ") must divide data's channels (" +
           std::to_string(c) + ")";
  const int64_t extent = a.dilate * (a.kernel - 1) + 1;  // < 2^62: both factors < 2^31
  if (width + 2 * a.pad < extent)
    return "kernel (dilated extent " + std::to_string(extent) +
           ") is larger than the padded width (" + std::to_string(width) + " + 2*" +
           std::to_string(a.pad) + ") of data";
  const int64_t out = conv_out_width(a, width);
  if (out > kMaxExtent || n * a.num_filter > kMaxExtent / out)
    return "pad (" + std::to_string(a.pad) + ") and stride (" + std::to_string(a.stride) +
           ") give an output of " + std::to_string(n) + " x " + std::to_string(a.num_filter) +
           " x " + std::to_string(out) + " elements, more than " + std::to_string(kMaxExtent);
  const int64_t wsize = a.num_filter * (c / a.num_group);
  if (wsize > kMaxExtent / a.kernel)
    return "weight (" + std::to_string(a.num_filter) + ", " + std::to_string(c / a.num_group) +
           ", " + std::to_string(a.kernel) + ") has more than " + std::to_string(kMaxExtent) +
           " elements";
  return "";
}

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// The checks of a kernel call (fusedres._C), as fusedres.attrs.ConvAttrs.for_kernel: the
// attributes, then data, then the weight's shape, which gives kernel and num_filter. Fills
// `out` and returns "" when valid.
inline std::string check_kernel_call(const std::vector<int64_t>& data,
                                     const std::vector<int64_t>& weight, int64_t stride,
                                     int64_t pad, int64_t dilate, int64_t num_group, double eps,
                                     double momentum, ConvAttrs* out) {
  if (weight.size() != 3)
    return "weight must be 3-D (num_filter, channels / num_group, kernel), got shape " +
           shape_str(weight);
  if (weight[0] < 1 || weight[1] < 1 || weight[2] < 1)
    return "weight must have no zero-size dimension, got shape " + shape_str(weight);
  ConvAttrs a;
  a.num_filter = weight[0];
  a.kernel = weight[2];
  a.stride = stride;
  a.pad = pad;
  a.dilate = dilate;
  a.num_group = num_group;
  a.eps = eps;
  a.momentum = momentum;
  std::string e = check_conv_attrs(a);
  if (!e.empty()) return e;
  if (data.size() != 3)
    return "data must be 3-D (batch, channels, width), got shape " + shape_str(data);
  if (!(e = check_conv_data(a, data[0], data[1], data[2])).empty()) return e;
  const std::vector<int64_t> expected = {a.num_filter, data[1] / a.num_group, a.kernel};
  if (weight != expected)
    return "weight must have shape " + shape_str(expected) + " for data of shape " +
           shape_str(data) + ", got " + shape_str(weight);
  *out = a;
  return "";
}

inline Conv1dShape conv_shape(const ConvAttrs& a, int64_t n, int64_t c, int64_t width) {
  return Conv1dShape{n, c, width, a.num_filter, a.kernel, a.stride, a.pad, a.dilate, a.num_group};
}

}  // namespace fusedres
