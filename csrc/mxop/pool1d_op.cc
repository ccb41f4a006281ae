// _fusedres_pool1d: 1-D max or average pooling of NCW data (csrc/cpu/pool1d.h), a stateless
// CPU op whose backward (_backward_fusedres_pool1d) reads the head gradient and the data.
#include <string>
#include <vector>

#include "cpu/pool1d.h"
#include "mxop/attrs.h"
#include "mxop/nnvm_bridge.h"
#include "mxop/ops.h"
#include "mxop/target.h"

namespace fusedres {
namespace mxop {

const char kPoolOp[] = "_fusedres_pool1d";
const char kPoolBackwardOp[] = "_backward_fusedres_pool1d";

namespace {

Pool1dShape pool_shape(const PoolAttrs& a, const mxnet::TShape& x) {
  Pool1dShape s;
  s.rows = int64_t(x[0]) * int64_t(x[1]);
  s.L = x[2];
  s.K = a.kernel;
  s.stride = a.stride;
  s.pad = a.pad;
  s.full = a.full;
  s.max = a.max;
  s.count_include_pad = a.count_include_pad;
  return s;
}

}  // namespace

std::vector<std::string> pool_input_names(const nnvm::NodeAttrs&) { return {"data"}; }

bool pool_infer_shape(const nnvm::NodeAttrs& attrs, mxnet::ShapeVector* in,
                      mxnet::ShapeVector* out) {
  const PoolAttrs a = parse_pool_attrs(attrs);
  const mxnet::TShape& x = (*in)[0];
  if (!mxnet::ndim_is_known(x)) return false;
  if (x.ndim() != 3)
    fail("ValueError", "data must be 3-D (batch, channels, width), got shape " + shape_str(x));
  if (!mxnet::shape_is_known(x)) return false;
  if (x.Size() == 0)
    fail("ValueError", "data must have no zero-size dimension, got shape " + shape_str(x));
  if (a.pad >= a.kernel)
    fail("ValueError", "pad (" + std::to_string(a.pad) + ") must be smaller than kernel (" +
                           std::to_string(a.kernel) + ")");
  if (x[2] + 2 * a.pad < a.kernel)
    fail("ValueError", "kernel (" + std::to_string(a.kernel) + ") is wider than the padded width " +
                           std::to_string(x[2] + 2 * a.pad) + " of data " + shape_str(x));
  const Pool1dShape s = pool_shape(a, x);
  (*out)[0] = mxnet::TShape({x[0], x[1], static_cast<int64_t>(s.Lout())});
  return true;
}

bool pool_infer_type(const nnvm::NodeAttrs&, std::vector<int>* in, std::vector<int>* out) {
  return infer_same_float_type({"data"}, in, out);
}

void pool_forward(const nnvm::NodeAttrs& attrs, const OpContext&, const BlobVec& in,
                  const ReqVec& req, const BlobVec& out) {
  const Pool1dShape s = pool_shape(parse_pool_attrs(attrs), in[0].shape_);
  by_dtype(in[0].type_flag_, "data", [&](auto tag) {
    using T = decltype(tag);
    Target<T> y(out[0], req[0]);
    if (!y.ptr()) return;
    fusedres::pool1d_forward<T>(s, in[0].dptr<T>(), y.ptr());
    y.commit();
  });
}

// in: dy, data, output; out: d data.
void pool_backward(const nnvm::NodeAttrs& attrs, const OpContext&, const BlobVec& in,
                   const ReqVec& req, const BlobVec& out) {
  const Pool1dShape s = pool_shape(parse_pool_attrs(attrs), in[1].shape_);
  by_dtype(in[0].type_flag_, "data", [&](auto tag) {
    using T = decltype(tag);
    Target<T> dx(out[0], req[0]);
    if (!dx.ptr()) return;
    fusedres::pool1d_backward<T>(s, in[0].dptr<T>(), in[1].dptr<T>(), dx.ptr());
    dx.commit();
  });
}

// Backward inputs: the head gradient, the data and the output (MXNet's ElemwiseGradUseInOut:
// the imperative recorder asks a gradient function which arrays to keep before the node has
// its inputs, so the function must not read node->inputs itself).
std::vector<nnvm::NodeEntry> pool_gradient(const nnvm::ObjectPtr& node,
                                           const std::vector<nnvm::NodeEntry>& ograds) {
  return mxnet::op::ElemwiseGradUseInOut{kPoolBackwardOp}(node, ograds);
}

}  // namespace mxop
}  // namespace fusedres
