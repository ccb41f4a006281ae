// libfusedres_mxop.so: registers the fused ops in libmxnet's operator registry, next to
// MXNet's own (fusedres/ops/native.py loads it and calls fusedres_mxop_register once).
// Every operator attribute is attached here; the hooks live in <family>_op.cc.
#include <exception>
#include <string>

#include "mxop/nnvm_bridge.h"
#include "mxop/ops.h"

namespace fusedres {
namespace mxop {

namespace {
bool g_legacy_invoker = true;
}

bool legacy_invoker() { return g_legacy_invoker; }
void set_legacy_invoker(bool on) { g_legacy_invoker = on; }

PendingAttr& pending_attr() {
  static PendingAttr p;
  return p;
}

template struct Expose<OpIndex, &nnvm::Op::index_>;
template struct Expose<OpUpdateAttrMap, &nnvm::Op::UpdateAttrMap>;
FUSEDRES_EXPOSE_OPMAP(bool)
FUSEDRES_EXPOSE_OPMAP(nnvm::FListInputNames)
FUSEDRES_EXPOSE_OPMAP(nnvm::FMutateInputs)
FUSEDRES_EXPOSE_OPMAP(nnvm::FInplaceOption)
FUSEDRES_EXPOSE_OPMAP(nnvm::FGradient)
FUSEDRES_EXPOSE_OPMAP(nnvm::FInferType)
FUSEDRES_EXPOSE_OPMAP(mxnet::FInferShape)
FUSEDRES_EXPOSE_OPMAP(mxnet::FCompute)
FUSEDRES_EXPOSE_OPMAP(mxnet::FCreateOpState)
FUSEDRES_EXPOSE_OPMAP(mxnet::FStatefulCompute)

namespace {

using Attrs = nnvm::NodeAttrs;

void register_conv() {
  nnvm::Op* f = new_op(kConvOp);
  f->describe("relu(BatchNorm(Convolution(data))) for 1-D NCW data, fused (fusedres).");
  for (const char* name :
       {"data", "weight", "bias", "gamma", "beta", "running_mean", "running_var"})
    f->add_argument(name, "NDArray-or-Symbol", "");
  f->set_num_inputs(Fn<uint32_t(const Attrs&)>::make<&conv_num_inputs>());
  f->set_num_outputs(1);
  set_attr(f, "FListInputNames",
           Fn<std::vector<std::string>(const Attrs&)>::make<&conv_input_names>());
  set_attr(f, "FMutateInputs",
           Fn<std::vector<uint32_t>(const Attrs&)>::make<&conv_mutate_inputs>());
  set_attr(
      f, "FInferShape",
      Fn<bool(const Attrs&, mxnet::ShapeVector*, mxnet::ShapeVector*)>::make<&conv_infer_shape>());
  set_attr(f, "FInferType",
           Fn<bool(const Attrs&, std::vector<int>*, std::vector<int>*)>::make<&conv_infer_type>());
  set_attr(f, "FCreateOpState",
           Fn<OpStatePtr(const Attrs&, mxnet::Context, const mxnet::ShapeVector&,
                         const std::vector<int>&)>::make<&conv_create_state>());
  set_attr(f, "FStatefulCompute<cpu>",
           Fn<void(const OpStatePtr&, const OpContext&, const BlobVec&, const ReqVec&,
                   const BlobVec&)>::make<&conv_forward>());
  set_attr(
      f, "FGradient",
      Fn<std::vector<nnvm::NodeEntry>(
          const nnvm::ObjectPtr&, const std::vector<nnvm::NodeEntry>&)>::make<&conv_gradient>());

  nnvm::Op* b = new_op(kConvBackwardOp);
  b->set_num_inputs(Fn<uint32_t(const Attrs&)>::make<&conv_backward_num_inputs>());
  b->set_num_outputs(Fn<uint32_t(const Attrs&)>::make<&conv_num_inputs>());
  set_attr(b, "TIsBackward", true);
  set_attr(b, "TIsLayerOpBackward", true);
  set_attr(b, "FStatefulCompute<cpu>",
           Fn<void(const OpStatePtr&, const OpContext&, const BlobVec&, const ReqVec&,
                   const BlobVec&)>::make<&conv_backward>());
}

void register_add() {
  nnvm::Op* f = new_op(kAddOp);
  f->describe("relu(lhs + rhs) for arrays of the same shape, fused (fusedres).");
  f->add_argument("lhs", "NDArray-or-Symbol", "");
  f->add_argument("rhs", "NDArray-or-Symbol", "");
  f->set_num_inputs(2);
  f->set_num_outputs(1);
  set_attr(f, "FListInputNames",
           Fn<std::vector<std::string>(const Attrs&)>::make<&add_input_names>());
  set_attr(
      f, "FInferShape",
      Fn<bool(const Attrs&, mxnet::ShapeVector*, mxnet::ShapeVector*)>::make<&add_infer_shape>());
  set_attr(f, "FInferType",
           Fn<bool(const Attrs&, std::vector<int>*, std::vector<int>*)>::make<&add_infer_type>());
  set_attr(f, "FInplaceOption",
           Fn<std::vector<std::pair<int, int>>(const Attrs&)>::make<&add_inplace>());
  set_attr(f, "FCompute<cpu>",
           Fn<void(const Attrs&, const OpContext&, const BlobVec&, const ReqVec&,
                   const BlobVec&)>::make<&add_forward>());
  set_attr(
      f, "FGradient",
      Fn<std::vector<nnvm::NodeEntry>(const nnvm::ObjectPtr&,
                                      const std::vector<nnvm::NodeEntry>&)>::make<&add_gradient>());

  nnvm::Op* b = new_op(kAddBackwardOp);
  b->set_num_inputs(2);
  b->set_num_outputs(2);
  set_attr(b, "TIsBackward", true);
  set_attr(b, "FInplaceOption",
           Fn<std::vector<std::pair<int, int>>(const Attrs&)>::make<&add_backward_inplace>());
  set_attr(b, "FCompute<cpu>",
           Fn<void(const Attrs&, const OpContext&, const BlobVec&, const ReqVec&,
                   const BlobVec&)>::make<&add_backward>());
}

void register_pool() {
  nnvm::Op* f = new_op(kPoolOp);
  f->describe("1-D max or average pooling of NCW data, as Pooling computes it (fusedres).");
  f->add_argument("data", "NDArray-or-Symbol", "");
  f->set_num_inputs(1);
  f->set_num_outputs(1);
  set_attr(f, "FListInputNames",
           Fn<std::vector<std::string>(const Attrs&)>::make<&pool_input_names>());
  set_attr(
      f, "FInferShape",
      Fn<bool(const Attrs&, mxnet::ShapeVector*, mxnet::ShapeVector*)>::make<&pool_infer_shape>());
  set_attr(f, "FInferType",
           Fn<bool(const Attrs&, std::vector<int>*, std::vector<int>*)>::make<&pool_infer_type>());
  set_attr(f, "FCompute<cpu>",
           Fn<void(const Attrs&, const OpContext&, const BlobVec&, const ReqVec&,
                   const BlobVec&)>::make<&pool_forward>());
  set_attr(
      f, "FGradient",
      Fn<std::vector<nnvm::NodeEntry>(
          const nnvm::ObjectPtr&, const std::vector<nnvm::NodeEntry>&)>::make<&pool_gradient>());

  nnvm::Op* b = new_op(kPoolBackwardOp);
  b->set_num_inputs(3);
  b->set_num_outputs(1);
  set_attr(b, "TIsBackward", true);
  set_attr(b, "FCompute<cpu>",
           Fn<void(const Attrs&, const OpContext&, const BlobVec&, const ReqVec&,
                   const BlobVec&)>::make<&pool_backward>());
}

void register_layout_copy() {
  nnvm::Op* f = new_op(kLayoutCopyOp);
  f->describe("data copied into a new array in the default layout (fusedres).");
  f->add_argument("data", "NDArray-or-Symbol", "");
  f->set_num_inputs(1);
  f->set_num_outputs(1);
  set_attr(f, "FListInputNames",
           Fn<std::vector<std::string>(const Attrs&)>::make<&copy_input_names>());
  set_attr(
      f, "FInferShape",
      Fn<bool(const Attrs&, mxnet::ShapeVector*, mxnet::ShapeVector*)>::make<&copy_infer_shape>());
  set_attr(f, "FInferType",
           Fn<bool(const Attrs&, std::vector<int>*, std::vector<int>*)>::make<&copy_infer_type>());
  set_attr(f, "FCompute<cpu>",
           Fn<void(const Attrs&, const OpContext&, const BlobVec&, const ReqVec&,
                   const BlobVec&)>::make<&copy_forward>());
  set_attr(
      f, "FGradient",
      Fn<std::vector<nnvm::NodeEntry>(
          const nnvm::ObjectPtr&, const std::vector<nnvm::NodeEntry>&)>::make<&copy_gradient>());
}

std::string g_error;

}  // namespace
}  // namespace mxop
}  // namespace fusedres

// legacy_invoker: 1 when libmxnet was built by GCC < 5 (its std::function passes invoker
// arguments by value). Returns null on success, else what went wrong. Registers once.
extern "C" __attribute__((visibility("default"))) const char* fusedres_mxop_register(
    int legacy_invoker) {
  using namespace fusedres::mxop;
  static bool done = false;
  if (done) return nullptr;
  try {
    set_legacy_invoker(legacy_invoker != 0);
    register_conv();
    register_add();
    register_layout_copy();
    register_pool();
  } catch (const std::exception& e) {
    g_error = e.what();
    return g_error.c_str();
  }
  done = true;
  return nullptr;
}
