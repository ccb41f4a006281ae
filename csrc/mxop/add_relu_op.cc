// _fusedres_add_relu: relu(lhs + rhs) for same-shape arrays, a stateless CPU op whose backward
// (_backward_fusedres_add_relu) reads only the head gradient and the output.
#include <string>
#include <vector>

#include "cpu/add_relu.h"
#include "mxop/attrs.h"
#include "mxop/nnvm_bridge.h"
#include "mxop/ops.h"
#include "mxop/target.h"

namespace fusedres {
namespace mxop {

const char kAddOp[] = "_fusedres_add_relu";
const char kAddBackwardOp[] = "_backward_fusedres_add_relu";

std::vector<std::string> add_input_names(const nnvm::NodeAttrs&) { return {"lhs", "rhs"}; }

bool add_infer_shape(const nnvm::NodeAttrs& attrs, mxnet::ShapeVector* in,
                     mxnet::ShapeVector* out) {
  check_known_attrs(attrs, {}, kAddOp);
  mxnet::TShape& lhs = (*in)[0];
  mxnet::TShape& rhs = (*in)[1];
  const char* names[2] = {"lhs", "rhs"};
  for (int i = 0; i < 2; ++i) {
    const mxnet::TShape& s = (*in)[i];
    if (mxnet::shape_is_known(s) && s.Size() == 0)
      fail("ValueError",
           std::string(names[i]) + " must have no zero-size dimension, got shape " + shape_str(s));
  }
  const bool lk = mxnet::shape_is_known(lhs), rk = mxnet::shape_is_known(rhs);
  if (lk && rk && lhs != rhs)
    fail("ValueError", "rhs must have the same shape as lhs " + shape_str(lhs) + ", got " +
                           shape_str(rhs) + " (add_relu does not broadcast)");
  if (!lk && !rk) return false;
  const mxnet::TShape shape = lk ? lhs : rhs;
  lhs = rhs = shape;
  (*out)[0] = shape;
  return true;
}

bool add_infer_type(const nnvm::NodeAttrs&, std::vector<int>* in, std::vector<int>* out) {
  return infer_same_float_type({"lhs", "rhs"}, in, out);
}

// The output may take either input's memory, the lhs gradient the head gradient's: every
// element is read before it is written.
std::vector<std::pair<int, int>> add_inplace(const nnvm::NodeAttrs&) { return {{0, 0}, {1, 0}}; }
std::vector<std::pair<int, int>> add_backward_inplace(const nnvm::NodeAttrs&) { return {{0, 0}}; }

void add_forward(const nnvm::NodeAttrs&, const OpContext&, const BlobVec& in, const ReqVec& req,
                 const BlobVec& out) {
  by_dtype(in[0].type_flag_, "lhs", [&](auto tag) {
    using T = decltype(tag);
    Target<T> y(out[0], req[0]);
    if (!y.ptr()) return;
    fusedres::add_relu_forward<T>(int64_t(in[0].shape_.Size()), in[0].dptr<T>(), in[1].dptr<T>(),
                                  y.ptr());
    y.commit();
  });
}

// in: dy, y; out: d lhs, d rhs.
void add_backward(const nnvm::NodeAttrs&, const OpContext&, const BlobVec& in, const ReqVec& req,
                  const BlobVec& out) {
  by_dtype(in[0].type_flag_, "lhs", [&](auto tag) {
    using T = decltype(tag);
    Target<T> da(out[0], req[0]), db(out[1], req[1]);
    fusedres::add_relu_backward<T>(int64_t(in[0].shape_.Size()), in[0].dptr<T>(), in[1].dptr<T>(),
                                   da.ptr(), db.ptr());
    da.commit();
    db.commit();
  });
}

std::vector<nnvm::NodeEntry> add_gradient(const nnvm::ObjectPtr& node,
                                          const std::vector<nnvm::NodeEntry>& ograds) {
  // Backward inputs: the head gradient and this node's output.
  const std::vector<nnvm::NodeEntry> output = {nnvm::NodeEntry(node, 0, 0)};
  return mxnet::op::MakeNonlossGradNode(kAddBackwardOp, node, ograds, output, node->attrs.dict);
}

}  // namespace mxop
}  // namespace fusedres
