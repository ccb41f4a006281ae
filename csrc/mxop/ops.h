// The hooks of the two op families, as MXNet's operator attributes expect them; library.cc
// attaches them to the registry (the only place that does).
//
//   _fusedres_conv1d_bn_relu(data, weight, [bias], gamma, beta, running_mean, running_var)
//     attributes: kernel, num_filter, stride, pad, dilate, num_group, no_bias, eps, momentum,
//     use_global_stats, relu (see fusedres/ops/attrs.py); running_mean and running_var are
//     auxiliary states (FMutateInputs), updated in place by a training forward.
//   _fusedres_add_relu(lhs, rhs)
//   _fusedres_pool1d(data): 1-D max/average pooling (kernel, stride, pad, pool_type,
//     pooling_convention, count_include_pad)
//   _fusedres_layout_copy(data): a copy in the default layout, the CustomOps' guard
// All are CPU ops with MXNet's full contract: OpReqType for every output (write, in place,
// add, null) and OpContext::is_train in every executor.
#pragma once
#include <string>
#include <vector>

#include <mxnet/op_attr_types.h>
#include <nnvm/node.h>

namespace fusedres {
namespace mxop {

using mxnet::OpContext;
using mxnet::OpReqType;
using mxnet::OpStatePtr;
using mxnet::TBlob;
using BlobVec = std::vector<TBlob>;
using ReqVec = std::vector<OpReqType>;

extern const char kConvOp[];
extern const char kConvBackwardOp[];
extern const char kAddOp[];
extern const char kAddBackwardOp[];
extern const char kLayoutCopyOp[];
extern const char kPoolOp[];
extern const char kPoolBackwardOp[];

// conv1d_bn_relu
uint32_t conv_num_inputs(const nnvm::NodeAttrs& attrs);
uint32_t conv_backward_num_inputs(const nnvm::NodeAttrs& attrs);
std::vector<std::string> conv_input_names(const nnvm::NodeAttrs& attrs);
std::vector<uint32_t> conv_mutate_inputs(const nnvm::NodeAttrs& attrs);
bool conv_infer_shape(const nnvm::NodeAttrs& attrs, mxnet::ShapeVector* in,
                      mxnet::ShapeVector* out);
bool conv_infer_type(const nnvm::NodeAttrs& attrs, std::vector<int>* in, std::vector<int>* out);
OpStatePtr conv_create_state(const nnvm::NodeAttrs& attrs, mxnet::Context ctx,
                             const mxnet::ShapeVector& in_shape, const std::vector<int>& in_type);
void conv_forward(const OpStatePtr& state, const OpContext& ctx, const BlobVec& in,
                  const ReqVec& req, const BlobVec& out);
void conv_backward(const OpStatePtr& state, const OpContext& ctx, const BlobVec& in,
                   const ReqVec& req, const BlobVec& out);
std::vector<nnvm::NodeEntry> conv_gradient(const nnvm::ObjectPtr& node,
                                           const std::vector<nnvm::NodeEntry>& ograds);

// add_relu
std::vector<std::string> add_input_names(const nnvm::NodeAttrs& attrs);
bool add_infer_shape(const nnvm::NodeAttrs& attrs, mxnet::ShapeVector* in, mxnet::ShapeVector* out);
bool add_infer_type(const nnvm::NodeAttrs& attrs, std::vector<int>* in, std::vector<int>* out);
std::vector<std::pair<int, int>> add_inplace(const nnvm::NodeAttrs& attrs);
std::vector<std::pair<int, int>> add_backward_inplace(const nnvm::NodeAttrs& attrs);
void add_forward(const nnvm::NodeAttrs& attrs, const OpContext& ctx, const BlobVec& in,
                 const ReqVec& req, const BlobVec& out);
void add_backward(const nnvm::NodeAttrs& attrs, const OpContext& ctx, const BlobVec& in,
                  const ReqVec& req, const BlobVec& out);
std::vector<nnvm::NodeEntry> add_gradient(const nnvm::ObjectPtr& node,
                                          const std::vector<nnvm::NodeEntry>& ograds);

// pool1d
std::vector<std::string> pool_input_names(const nnvm::NodeAttrs& attrs);
bool pool_infer_shape(const nnvm::NodeAttrs& attrs, mxnet::ShapeVector* in,
                      mxnet::ShapeVector* out);
bool pool_infer_type(const nnvm::NodeAttrs& attrs, std::vector<int>* in, std::vector<int>* out);
void pool_forward(const nnvm::NodeAttrs& attrs, const OpContext& ctx, const BlobVec& in,
                  const ReqVec& req, const BlobVec& out);
void pool_backward(const nnvm::NodeAttrs& attrs, const OpContext& ctx, const BlobVec& in,
                   const ReqVec& req, const BlobVec& out);
std::vector<nnvm::NodeEntry> pool_gradient(const nnvm::ObjectPtr& node,
                                           const std::vector<nnvm::NodeEntry>& ograds);

// layout_copy (the CustomOps' guard)
std::vector<std::string> copy_input_names(const nnvm::NodeAttrs& attrs);
bool copy_infer_shape(const nnvm::NodeAttrs& attrs, mxnet::ShapeVector* in,
                      mxnet::ShapeVector* out);
bool copy_infer_type(const nnvm::NodeAttrs& attrs, std::vector<int>* in, std::vector<int>* out);
void copy_forward(const nnvm::NodeAttrs& attrs, const OpContext& ctx, const BlobVec& in,
                  const ReqVec& req, const BlobVec& out);
std::vector<nnvm::NodeEntry> copy_gradient(const nnvm::ObjectPtr& node,
                                           const std::vector<nnvm::NodeEntry>& ograds);

// Shared by both: every tensor of an op has the data's floating dtype (float32 or float64).
bool infer_same_float_type(const std::vector<std::string>& names, std::vector<int>* in,
                           std::vector<int>* out);

}  // namespace mxop
}  // namespace fusedres
