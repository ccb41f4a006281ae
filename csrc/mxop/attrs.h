// Reading the ops' attributes from NodeAttrs::dict (strings, as MXNet keeps them) and raising
// errors MXNet's Python frontend turns into ValueError/TypeError ("ValueError: <message>").
#pragma once
#include <string>
#include <vector>

#include <mxnet/base.h>
#include <nnvm/node.h>

#include "conv_attrs.h"

namespace fusedres {
namespace mxop {

// Throws dmlc::Error("<kind>: <message>"); kind is "ValueError" or "TypeError".
[[noreturn]] void fail(const char* kind, const std::string& message);

// The conv op's attributes, parsed and checked (check_conv_attrs); momentum rounded through
// float32 as MXNet's BatchNorm holds it.
ConvAttrs parse_conv_attrs(const nnvm::NodeAttrs& attrs);

// The pool1d op's attributes (csrc/cpu/pool1d.h), parsed and checked: kernel >= 1, stride >= 1,
// 0 <= pad, pool_type 'max' or 'avg', pooling_convention 'valid' or 'full',
// count_include_pad (average only).
struct PoolAttrs {
  int64_t kernel = 0, stride = 1, pad = 0;
  bool max = true, full = false, count_include_pad = true;
};
PoolAttrs parse_pool_attrs(const nnvm::NodeAttrs& attrs);

// Refuses attributes an op does not have (MXNet's own "__...__" ones are ignored).
void check_known_attrs(const nnvm::NodeAttrs& attrs, const std::vector<std::string>& known,
                       const char* op);

std::string shape_str(const mxnet::TShape& s);
const char* dtype_name(int type_flag);

// Calls f(float{}) or f(double{}) for a float32 or float64 type flag; else a TypeError naming
// `what` (the input whose dtype it is).
template <typename F>
void by_dtype(int type_flag, const char* what, F&& f) {
  if (type_flag == mshadow::kFloat32) return f(float{});
  if (type_flag == mshadow::kFloat64) return f(double{});
  fail("TypeError",
       std::string(what) + " must be float32 or float64, got " + dtype_name(type_flag));
}

}  // namespace mxop
}  // namespace fusedres
