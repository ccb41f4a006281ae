// _fusedres_conv1d_bn_relu: a stateful CPU op. A training forward keeps z (the conv output),
// mean and invstd in the op state for its backward (_backward_fusedres_conv1d_bn_relu, which
// shares the state: TIsLayerOpBackward); an inference forward folds batchnorm into the conv.
#include <string>
#include <vector>

#include "cpu/conv1d_bn_relu.h"
#include "mxop/attrs.h"
#include "mxop/buffer_pool.h"
#include "mxop/nnvm_bridge.h"
#include "mxop/ops.h"
#include "mxop/target.h"

namespace fusedres {
namespace mxop {

const char kConvOp[] = "_fusedres_conv1d_bn_relu";
const char kConvBackwardOp[] = "_backward_fusedres_conv1d_bn_relu";

namespace {

// Inputs: data, weight, [bias], gamma, beta, running_mean, running_var.
struct ConvInputs {
  int nb;  // 1 with a bias
  int gamma() const { return 2 + nb; }
  int beta() const { return 3 + nb; }
  int running_mean() const { return 4 + nb; }
  int running_var() const { return 5 + nb; }
  int count() const { return 6 + nb; }
};

ConvInputs conv_inputs(const ConvAttrs& a) { return ConvInputs{a.no_bias ? 0 : 1}; }

bool parse_no_bias(const nnvm::NodeAttrs& attrs) {
  // Called before the full parse (input counts): a malformed value is reported by that parse.
  const std::string* v = find_attr(attrs, "no_bias");
  return v != nullptr && (*v == "True" || *v == "true" || *v == "1");
}

}  // namespace

class ConvState {
 public:
  explicit ConvState(const ConvAttrs& a) : a_(a) {}

  template <typename T>
  void forward(const OpContext& ctx, const BlobVec& in, const ReqVec& req, const BlobVec& out) {
    const ConvInputs ix = conv_inputs(a_);
    const Conv1dShape s = shape_of(in[0]);
    Target<T> y(out[0], req[0]);
    const T* bias = a_.no_bias ? nullptr : in[2].dptr<T>();
    if (ctx.is_train) {
      // Batch statistics unless use_global_stats; the running statistics are updated then.
      train_forward<T>(s, in, 0, y.ptr_always(), !a_.use_global_stats);
    } else {
      if (req[0] == mxnet::kNullOp) return;
      fusedres::conv1d_bn_relu_forward_infer<T>(
          s, in[0].dptr<T>(), in[1].dptr<T>(), bias, in[ix.gamma()].dptr<T>(),
          in[ix.beta()].dptr<T>(), in[ix.running_mean()].dptr<T>(), in[ix.running_var()].dptr<T>(),
          a_.eps, y.ptr(), a_.relu);
      saved_ = false;
    }
    y.commit();
  }

  // in: dy, data, weight, [bias], gamma, beta, running_mean, running_var, y.
  // out: gradients of data, weight, [bias], gamma, beta, running_mean, running_var.
  template <typename T>
  void backward(const BlobVec& in, const ReqVec& req, const BlobVec& out) {
    const ConvInputs ix = conv_inputs(a_);
    const Conv1dShape s = shape_of(in[1]);
    if (!saved_) {
      // After an inference-mode forward (recorded with train_mode=False): the gradient of
      // what that forward computed, at the running statistics.
      Buffer scratch;
      train_forward<T>(s, in, 1, scratch.get<T>(s.N * s.Cout * s.Lout()), false);
    }
    Target<T> dx(out[0], req[0]), dw(out[1], req[1]), dgamma(out[ix.gamma()], req[ix.gamma()]),
        dbeta(out[ix.beta()], req[ix.beta()]);
    Target<T> dbias(out[a_.no_bias ? 1 : 2], a_.no_bias ? mxnet::kNullOp : req[2]);
    fusedres::conv1d_bn_relu_backward<T>(
        s, batch_stats_, in[0].dptr<T>(), in[1].dptr<T>(), in[2].dptr<T>(), z_.as<T>(),
        in[1 + ix.gamma()].dptr<T>(), in[1 + ix.beta()].dptr<T>(), mean_.as<T>(), invstd_.as<T>(),
        dx.ptr(), dw.ptr(), dbias.ptr(), dgamma.ptr(), dbeta.ptr(), a_.relu);
    for (Target<T>* t : {&dx, &dw, &dbias, &dgamma, &dbeta}) t->commit();
    // Auxiliary states have no gradient; should anyone ask for one, it is zero.
    for (int i : {ix.running_mean(), ix.running_var()}) {
      if (req[i] == mxnet::kWriteTo || req[i] == mxnet::kWriteInplace) {
        T* d = out[i].dptr<T>();
        for (int64_t c = 0; c < s.Cout; ++c) d[c] = T(0);
      }
    }
    // The saved tensors stay: a second backward (retain_graph=True) needs them again; they
    // go with the state when MXNet drops the graph.
  }

 private:
  Conv1dShape shape_of(const TBlob& data) const {
    return conv_shape(a_, data.shape_[0], data.shape_[1], data.shape_[2]);
  }

  // The training forward over the inputs at in[off...], keeping z, mean and invstd.
  template <typename T>
  void train_forward(const Conv1dShape& s, const BlobVec& in, int off, T* y, bool batch_stats) {
    const ConvInputs ix = conv_inputs(a_);
    const T* bias = a_.no_bias ? nullptr : in[off + 2].dptr<T>();
    fusedres::conv1d_bn_relu_forward_train<T>(
        s, in[off].dptr<T>(), in[off + 1].dptr<T>(), bias, in[off + ix.gamma()].dptr<T>(),
        in[off + ix.beta()].dptr<T>(), in[off + ix.running_mean()].dptr<T>(),
        in[off + ix.running_var()].dptr<T>(), a_.eps, a_.momentum, batch_stats,
        z_.get<T>(s.N * s.Cout * s.Lout()), mean_.get<T>(s.Cout), invstd_.get<T>(s.Cout), y,
        a_.relu);
    saved_ = true;
    batch_stats_ = batch_stats;
  }

  ConvAttrs a_;
  bool saved_ = false, batch_stats_ = false;
  Buffer z_, mean_, invstd_;
};

void no_op(mxnet::RunContext) {}

}  // namespace mxop
}  // namespace fusedres

// OpStatePtr::Create's deleter hands libmxnet a std::function taking RunContext by value, which
// GCC 4.8's libmxnet would call with the wrong convention (see nnvm_bridge.h): this
// specialization does what Create does with a callable libmxnet can call.
template <>
mxnet::OpStatePtr mxnet::OpStatePtr::Create<fusedres::mxop::ConvState, const fusedres::ConvAttrs&>(
    const fusedres::ConvAttrs& attrs) {
  OpStatePtr ret;
  auto* state = new fusedres::mxop::ConvState(attrs);
  const engine::VarHandle var = Engine::Get()->NewVariable();
  ret.ptr_.reset(new OpState(var, state), [](OpState* p) {
    Engine::Get()->DeleteVariable(
        fusedres::mxop::Fn<void(RunContext)>::make<&fusedres::mxop::no_op>(), Context::CPU(),
        p->var);
    delete static_cast<fusedres::mxop::ConvState*>(p->state);
    delete p;
  });
  return ret;
}

namespace fusedres {
namespace mxop {
uint32_t conv_num_inputs(const nnvm::NodeAttrs& attrs) { return parse_no_bias(attrs) ? 6 : 7; }

uint32_t conv_backward_num_inputs(const nnvm::NodeAttrs& attrs) {
  return 1 + conv_num_inputs(attrs) + 1;  // dy, the forward's inputs, its output
}

std::vector<std::string> conv_input_names(const nnvm::NodeAttrs& attrs) {
  std::vector<std::string> names = {"data", "weight"};
  if (!parse_no_bias(attrs)) names.push_back("bias");
  names.insert(names.end(), {"gamma", "beta", "running_mean", "running_var"});
  return names;
}

std::vector<uint32_t> conv_mutate_inputs(const nnvm::NodeAttrs& attrs) {
  const uint32_t n = conv_num_inputs(attrs);
  return {n - 2, n - 1};
}

bool conv_infer_shape(const nnvm::NodeAttrs& attrs, mxnet::ShapeVector* in,
                      mxnet::ShapeVector* out) {
  const ConvAttrs a = parse_conv_attrs(attrs);
  const auto names = conv_input_names(attrs);
  const mxnet::TShape& data = (*in)[0];
  if (!mxnet::ndim_is_known(data)) return false;
  if (data.ndim() != 3)
    fail("ValueError", "data must be 3-D (batch, channels, width), got shape " + shape_str(data));
  if (!mxnet::shape_is_known(data)) return false;  // partial inference: nothing to infer yet
  std::string err = check_conv_data(a, data[0], data[1], data[2]);
  if (!err.empty()) fail("ValueError", err);
  const mxnet::TShape weight(
      {static_cast<int64_t>(a.num_filter), data[1] / a.num_group, static_cast<int64_t>(a.kernel)});
  const mxnet::TShape channel({static_cast<int64_t>(a.num_filter)});
  for (size_t i = 1; i < in->size(); ++i) {
    const mxnet::TShape& want = i == 1 ? weight : channel;
    const mxnet::TShape& given = (*in)[i];
    if (mxnet::ndim_is_known(given)) {
      bool ok = given.ndim() == want.ndim();
      for (int d = 0; ok && d < given.ndim(); ++d)
        ok = !mxnet::dim_size_is_known(given, d) || given[d] == want[d];
      if (!ok)
        fail("ValueError", names[i] + " must have shape " + shape_str(want) +
                               (i == 1 ? " for data of shape " + shape_str(data) : "") + ", got " +
                               shape_str(given));
    }
    (*in)[i] = want;
  }
  (*out)[0] =
      mxnet::TShape({data[0], static_cast<int64_t>(a.num_filter), conv_out_width(a, data[2])});
  return true;
}

bool conv_infer_type(const nnvm::NodeAttrs& attrs, std::vector<int>* in, std::vector<int>* out) {
  parse_conv_attrs(attrs);
  return infer_same_float_type(conv_input_names(attrs), in, out);
}

OpStatePtr conv_create_state(const nnvm::NodeAttrs& attrs, mxnet::Context ctx,
                             const mxnet::ShapeVector&, const std::vector<int>&) {
  const ConvAttrs a = parse_conv_attrs(attrs);
  if (ctx.dev_mask() != mshadow::cpu::kDevMask)
    fail("ValueError",
         std::string("data is on a GPU: ") + kConvOp +
             " runs on the CPU (on GPUs the fused "
             "blocks use the CustomOp fusedres_conv1d_bn_relu; call hybridize() again after moving "
             "a hybridized model to the GPU)");
  return OpStatePtr::Create<ConvState>(a);
}

void conv_forward(const OpStatePtr& state, const OpContext& ctx, const BlobVec& in,
                  const ReqVec& req, const BlobVec& out) {
  by_dtype(in[0].type_flag_, "data", [&](auto tag) {
    state.get_state<ConvState>().forward<decltype(tag)>(ctx, in, req, out);
  });
}

void conv_backward(const OpStatePtr& state, const OpContext&, const BlobVec& in, const ReqVec& req,
                   const BlobVec& out) {
  by_dtype(in[1].type_flag_, "data",
           [&](auto tag) { state.get_state<ConvState>().backward<decltype(tag)>(in, req, out); });
}

std::vector<nnvm::NodeEntry> conv_gradient(const nnvm::ObjectPtr& node,
                                           const std::vector<nnvm::NodeEntry>& ograds) {
  return mxnet::op::ElemwiseGradUseInOut{kConvBackwardOp}(node, ograds);
}

bool infer_same_float_type(const std::vector<std::string>& names, std::vector<int>* in,
                           std::vector<int>* out) {
  int dt = -1;
  size_t first = 0;
  for (size_t i = 0; i < in->size() && dt < 0; ++i)
    if ((*in)[i] >= 0) dt = (*in)[i], first = i;
  if (dt < 0 && !out->empty() && (*out)[0] >= 0) dt = (*out)[0];
  if (dt < 0) return false;
  if (dt != mshadow::kFloat32 && dt != mshadow::kFloat64)
    fail("TypeError", names[first] +
                          " must be float32 or float64 on the CPU (the MXNet "
                          "operators' device), got " +
                          dtype_name(dt));
  for (size_t i = 0; i < in->size(); ++i) {
    const int t = (*in)[i];
    if (t >= 0 && t != dt)
      fail("TypeError", names[i] + " must have the same dtype as " + names[first] + " (" +
                            dtype_name(dt) + "), got " + dtype_name(t));
    (*in)[i] = dt;
  }
  for (auto& t : *out) t = dt;
  return true;
}

}  // namespace mxop
}  // namespace fusedres
