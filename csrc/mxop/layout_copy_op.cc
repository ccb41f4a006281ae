// _fusedres_layout_copy: y = x as a fresh array in MXNet's default layout, forward and
// backward. The CustomOps' guard on the CPU (fusedres/ops/custom.py): MXNet hands a CustomOp's
// callback freed memory for an input in an MKLDNN layout (docs/mxnet-facts.md), but converts an
// FCompute operator's inputs synchronously; this one never runs in place (no FInplaceOption),
// so its output is always a new default-layout array, and shapes infer both ways.
#include <cstring>
#include <string>
#include <vector>

#include "mxop/attrs.h"
#include "mxop/nnvm_bridge.h"
#include "mxop/ops.h"

namespace fusedres {
namespace mxop {

const char kLayoutCopyOp[] = "_fusedres_layout_copy";

std::vector<std::string> copy_input_names(const nnvm::NodeAttrs&) { return {"data"}; }

bool copy_infer_shape(const nnvm::NodeAttrs& attrs, mxnet::ShapeVector* in,
                      mxnet::ShapeVector* out) {
  check_known_attrs(attrs, {}, kLayoutCopyOp);
  mxnet::TShape& x = (*in)[0];
  mxnet::TShape& y = (*out)[0];
  if (mxnet::shape_is_known(x)) {
    y = x;
  } else if (mxnet::shape_is_known(y)) {
    x = y;
  } else {
    return false;
  }
  return true;
}

bool copy_infer_type(const nnvm::NodeAttrs&, std::vector<int>* in, std::vector<int>* out) {
  int& x = (*in)[0];
  int& y = (*out)[0];
  if (x < 0 && y < 0) return false;
  if (x < 0) x = y;
  y = x;
  return true;
}

void copy_forward(const nnvm::NodeAttrs&, const OpContext&, const BlobVec& in, const ReqVec& req,
                  const BlobVec& out) {
  const size_t bytes = in[0].shape_.Size() * mshadow::mshadow_sizeof(in[0].type_flag_);
  if (req[0] == mxnet::kWriteTo || req[0] == mxnet::kWriteInplace) {
    if (out[0].dptr_ != in[0].dptr_) std::memcpy(out[0].dptr_, in[0].dptr_, bytes);
  } else if (req[0] == mxnet::kAddTo) {
    MSHADOW_TYPE_SWITCH(in[0].type_flag_, T, {
      const T* src = in[0].dptr<T>();
      T* dst = out[0].dptr<T>();
      const int64_t n = int64_t(in[0].shape_.Size());
      for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
    });
  }
}

std::vector<nnvm::NodeEntry> copy_gradient(const nnvm::ObjectPtr& node,
                                           const std::vector<nnvm::NodeEntry>& ograds) {
  // The gradient is the head gradient, copied the same way (so it too arrives fresh and in
  // the default layout).
  return mxnet::op::MakeNonlossGradNode(kLayoutCopyOp, node, ograds, {}, node->attrs.dict);
}

}  // namespace mxop
}  // namespace fusedres
