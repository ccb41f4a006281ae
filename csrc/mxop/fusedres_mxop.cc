// MXNet external operator library (include/mxnet/lib_api.h, MXNet 1.9.1, library API v11):
// registers `_fusedres_conv1d_bn_relu` and `_fusedres_add_relu` as native ops on the CPU, on
// top of the kernels in csrc/cpu. Loaded with mx.library.load(); see fusedres/ops/native.py.
//
// The op contract mirrors the CustomOps in fusedres/ops (conv1d_bn_relu.py, add_relu.py):
//   _fusedres_conv1d_bn_relu(data, weight, [bias], gamma, beta, running_mean, running_var)
//     attrs: kernel, num_filter, stride, pad, dilate, num_group, no_bias, eps, momentum,
//            use_global_stats.  running_mean/running_var are mutable inputs (aux states).
//   _fusedres_add_relu(lhs, rhs)
//
// What lib_api 1.9.1 does NOT give an op, and how this file copes:
//   * is_train: neither forward nor the state factory receives it. The conv op is stateful:
//     its state is created on the thread that issues the op (Imperative::Invoke, and CachedOp's
//     dynamic and static runs, which create a fresh state per call), where MXNet's thread-local
//     training flag is the caller's; the state reads it there through MXNet's own C API
//     (MXAutogradIsTraining, looked up in the already loaded libmxnet.so). The legacy
//     GraphExecutor (Symbol.bind / Module) creates states once at bind time: there the mode is
//     the one current at bind time -- unsupported for training, see native.py.
//   * req: never passed. Outputs are always overwritten (kWriteTo). kAddTo (grad_req='add',
//     the GraphExecutor's and static_alloc CachedOp's in-place gradient aggregation) silently
//     overwrites instead of accumulating; fusedres/ops/native.py decides when the native path
//     is safe. kNullOp outputs are computed anyway (MXNet allocates them).
//   * Saved tensors: the stateful op keeps z (conv output), mean and invstd from the training
//     forward in its state for the backward (TIsLayerOpBackward shares the forward's state).
#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <stdexcept>
#include <unordered_set>
#include <utility>

#include "cpu/add_relu.h"
#include "cpu/conv1d_bn_relu.h"
// lib_api 1.9.1's error list (MXerrorMsgs) is never cleared: every later call of any op would
// report all earlier errors again, and MXNet formats (and leaks a copy of) the whole list after
// every successful callback too. Its members are private, so they are opened here to clear it
// (the standard headers it includes are included above, unaffected).
#define private public
#include "mxnet/lib_api.h"
#undef private

using namespace mxnet::ext;

namespace {

typedef std::unordered_map<std::string, std::string> Attrs;

// ---------------------------------------------------------------- MXNet's training flag
typedef int (*autograd_flag_fn_t)(bool*);
autograd_flag_fn_t g_is_training = nullptr, g_is_recording = nullptr;

struct SymbolLookup {
  const char* name;
  void* sym;
};

int find_libmxnet(struct dl_phdr_info* info, size_t, void* out) {
  auto* lookup = static_cast<SymbolLookup*>(out);
  const char* name = info->dlpi_name;
  if (name == nullptr || *name == '\0') return 0;
  const char* base = std::strrchr(name, '/');
  base = base ? base + 1 : name;
  if (std::strncmp(base, "libmxnet", 8) != 0) return 0;
  void* handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
  if (handle == nullptr) return 0;
  void* sym = dlsym(handle, lookup->name);
  dlclose(handle);  // RTLD_NOLOAD took a reference; MXNet keeps its own.
  if (sym == nullptr) return 0;
  lookup->sym = sym;
  return 1;
}

autograd_flag_fn_t lookup_mxnet(const char* name) {
  SymbolLookup lookup{name, nullptr};
  dl_iterate_phdr(find_libmxnet, &lookup);
  if (lookup.sym == nullptr) lookup.sym = dlsym(RTLD_DEFAULT, name);
  return reinterpret_cast<autograd_flag_fn_t>(lookup.sym);
}

bool lookup_is_training() {
  g_is_training = lookup_mxnet("MXAutogradIsTraining");
  g_is_recording = lookup_mxnet("MXAutogradIsRecording");
  return g_is_training != nullptr && g_is_recording != nullptr;
}

// Called first in every callback: drop the messages of an earlier, already reported failure.
// Only touches the list when it is non-empty, i.e. after an error.
void clear_errors() {
  MXerrorMsgs* m = MXerrorMsgs::get();
  if (m->messages.empty()) return;
  for (auto* ss : m->messages) delete ss;
  m->messages.clear();
}

bool caller_flag(autograd_flag_fn_t fn) {
  bool flag = false;
  if (fn != nullptr) fn(&flag);
  return flag;
}

// ---------------------------------------------------------------- attribute parsing
const char* dtype_name(int t) {
  switch (t) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case kUint8: return "uint8";
    case kInt32: return "int32";
    case kInt8: return "int8";
    case kInt64: return "int64";
    case 7: return "bool";
    default: return "an unsupported dtype";
  }
}

std::string shape_str(const std::vector<unsigned>& s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) os << ", ";
    os << s[i];
  }
  if (s.size() == 1) os << ",";
  os << ")";
  return os.str();
}

std::string strip(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\n"), e = s.find_last_not_of(" \t\n");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

// An int, or a 1-tuple/list of one int, as Python's str() writes them ("3", "(3,)", "[3]").
bool parse_int(const Attrs& attrs, const char* name, int64_t minimum, bool required,
               int64_t dflt, int64_t* out) {
  auto it = attrs.find(name);
  if (it == attrs.end()) {
    if (required) {
      MX_ERROR_MSG << name << " is required";
      return false;
    }
    *out = dflt;
    return true;
  }
  std::string s = strip(it->second);
  if (!s.empty() && (s.front() == '(' || s.front() == '[')) {
    char close = s.front() == '(' ? ')' : ']';
    if (s.back() != close) {
      MX_ERROR_MSG << name << " must be an int or a 1-tuple, got " << it->second;
      return false;
    }
    s = strip(s.substr(1, s.size() - 2));
    if (!s.empty() && s.back() == ',') s = strip(s.substr(0, s.size() - 1));
    if (s.find(',') != std::string::npos || s.empty()) {
      MX_ERROR_MSG << name << " must be a single int or a 1-tuple, got " << it->second;
      return false;
    }
  }
  size_t pos = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &pos);
  } catch (...) {
    pos = 0;
  }
  if (s.empty() || pos != s.size()) {
    MX_ERROR_MSG << name << " must be an int, got '" << it->second << "'";
    return false;
  }
  if (v < minimum) {
    MX_ERROR_MSG << name << " must be >= " << minimum << ", got " << v;
    return false;
  }
  *out = v;
  return true;
}

bool parse_float(const Attrs& attrs, const char* name, double dflt, double* out) {
  auto it = attrs.find(name);
  if (it == attrs.end()) {
    *out = dflt;
    return true;
  }
  std::string s = strip(it->second);
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (...) {
    pos = 0;
  }
  if (s.empty() || pos != s.size()) {
    MX_ERROR_MSG << name << " must be a number, got '" << it->second << "'";
    return false;
  }
  *out = v;
  return true;
}

bool parse_bool(const Attrs& attrs, const char* name, bool* out, bool fallback = false) {
  auto it = attrs.find(name);
  if (it == attrs.end()) {
    *out = fallback;
    return true;
  }
  std::string s = strip(it->second);
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s == "true" || s == "1") {
    *out = true;
  } else if (s == "false" || s == "0") {
    *out = false;
  } else {
    MX_ERROR_MSG << name << " must be a bool, got '" << it->second << "'";
    return false;
  }
  return true;
}

// MXNet adds its own "__...__" attributes (profiler scope, shapes after passes...).
bool check_known_attrs(const Attrs& attrs, const std::vector<std::string>& known,
                       const char* op) {
  for (const auto& kv : attrs) {
    if (kv.first.size() >= 2 && kv.first.compare(0, 2, "__") == 0) continue;
    bool ok = false;
    for (const auto& k : known) ok = ok || kv.first == k;
    if (!ok) {
      MX_ERROR_MSG << op << " got an unexpected parameter '" << kv.first << "'";
      return false;
    }
  }
  return true;
}

// Shapes of unknown dimensions arrive as (unsigned)-1 (numpy semantics) or 0 (legacy).
bool dim_known(unsigned d) { return d != 0 && d != std::numeric_limits<unsigned>::max(); }
bool shape_known(const std::vector<unsigned>& s) {
  if (s.empty()) return false;
  for (unsigned d : s)
    if (!dim_known(d)) return false;
  return true;
}

// ---------------------------------------------------------------- conv1d + bn + relu
struct ConvParams {
  int64_t num_filter, kernel, stride, pad, dilate, num_group;
  bool no_bias, use_global_stats, relu;
  double eps, momentum;
  int num_inputs() const { return no_bias ? 6 : 7; }
};

const char* kConvOp = "_fusedres_conv1d_bn_relu";

bool parse_conv(const Attrs& attrs, ConvParams* p) {
  if (!check_known_attrs(attrs, {"kernel", "num_filter", "stride", "pad", "dilate",
                                 "num_group", "no_bias", "eps", "momentum",
                                 "use_global_stats", "relu"}, kConvOp))
    return false;
  if (!parse_int(attrs, "num_filter", 1, true, 0, &p->num_filter)) return false;
  if (!parse_int(attrs, "kernel", 1, true, 0, &p->kernel)) return false;
  if (!parse_int(attrs, "stride", 1, false, 1, &p->stride)) return false;
  if (!parse_int(attrs, "pad", 0, false, 0, &p->pad)) return false;
  if (!parse_int(attrs, "dilate", 1, false, 1, &p->dilate)) return false;
  if (!parse_int(attrs, "num_group", 1, false, 1, &p->num_group)) return false;
  if (!parse_bool(attrs, "no_bias", &p->no_bias)) return false;
  if (!parse_bool(attrs, "use_global_stats", &p->use_global_stats)) return false;
  if (!parse_bool(attrs, "relu", &p->relu, true)) return false;
  if (!parse_float(attrs, "eps", 1e-5, &p->eps)) return false;
  if (!parse_float(attrs, "momentum", 0.9, &p->momentum)) return false;
  // MXNet's BatchNorm holds momentum as a C float; round the same way, as the CustomOp does.
  p->momentum = static_cast<double>(static_cast<float>(p->momentum));
  if (!(p->eps > 0)) {
    MX_ERROR_MSG << "eps must be > 0, got " << p->eps;
    return false;
  }
  if (p->num_filter % p->num_group) {
    MX_ERROR_MSG << "num_group (" << p->num_group << ") must divide num_filter ("
                 << p->num_filter << ")";
    return false;
  }
  return true;
}

std::vector<std::string> conv_arg_names(const ConvParams& p) {
  std::vector<std::string> n = {"data", "weight"};
  if (!p.no_bias) n.push_back("bias");
  n.insert(n.end(), {"gamma", "beta", "running_mean", "running_var"});
  return n;
}

MXReturnValue conv_parse_attrs(const Attrs& attrs, int* num_in, int* num_out) {
  clear_errors();
  ConvParams p;
  if (!parse_conv(attrs, &p)) return MX_FAIL;
  *num_in = p.num_inputs();
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue conv_mutate_inputs(const Attrs& attrs, std::vector<int>* idx) {
  clear_errors();
  ConvParams p;
  if (!parse_conv(attrs, &p)) return MX_FAIL;
  idx->push_back(p.num_inputs() - 2);
  idx->push_back(p.num_inputs() - 1);
  return MX_SUCCESS;
}

// All tensors share one floating dtype; unknown (-1) ones take it.
MXReturnValue infer_same_float_type(const std::vector<std::string>& names,
                                    std::vector<int>* in_types, std::vector<int>* out_types) {
  int dt = -1;
  size_t first = 0;
  for (size_t i = 0; i < in_types->size(); ++i) {
    if ((*in_types)[i] >= 0) {
      dt = (*in_types)[i];
      first = i;
      break;
    }
  }
  if (dt < 0 && !out_types->empty() && (*out_types)[0] >= 0) dt = (*out_types)[0];
  if (dt < 0) {
    MX_ERROR_MSG << "the dtype of " << names[0] << " is unknown";
    return MX_FAIL;
  }
  if (dt != kFloat32 && dt != kFloat64) {
    MX_ERROR_MSG << names[first] << " must be float32 or float64 (the native fusedres ops run "
                 << "on the CPU), got " << dtype_name(dt);
    return MX_FAIL;
  }
  for (size_t i = 0; i < in_types->size(); ++i) {
    int t = (*in_types)[i];
    if (t >= 0 && t != dt) {
      MX_ERROR_MSG << names[i] << " must have the same dtype as " << names[first] << " ("
                   << dtype_name(dt) << "), got " << dtype_name(t);
      return MX_FAIL;
    }
    (*in_types)[i] = dt;
  }
  for (auto& t : *out_types) t = dt;
  return MX_SUCCESS;
}

MXReturnValue conv_infer_type(const Attrs& attrs, std::vector<int>* in_types,
                              std::vector<int>* out_types) {
  clear_errors();
  ConvParams p;
  if (!parse_conv(attrs, &p)) return MX_FAIL;
  return infer_same_float_type(conv_arg_names(p), in_types, out_types);
}

int64_t conv_out_width(int64_t w, const ConvParams& p) {
  return (w + 2 * p.pad - p.dilate * (p.kernel - 1) - 1) / p.stride + 1;
}

MXReturnValue conv_infer_shape(const Attrs& attrs, std::vector<std::vector<unsigned>>* in,
                               std::vector<std::vector<unsigned>>* out) {
  clear_errors();
  ConvParams p;
  if (!parse_conv(attrs, &p)) return MX_FAIL;
  auto names = conv_arg_names(p);
  if (in->size() != names.size()) {
    MX_ERROR_MSG << kConvOp << " expects " << names.size() << " inputs, got " << in->size();
    return MX_FAIL;
  }
  const auto& data = (*in)[0];
  if (data.size() != 3) {
    MX_ERROR_MSG << "data must be 3-D (batch, channels, width), got shape "
                 << (data.empty() ? std::string("unknown") : shape_str(data));
    return MX_FAIL;
  }
  for (unsigned d : data) {
    if (!dim_known(d)) {
      MX_ERROR_MSG << "data must have no zero-size or unknown dimension, got shape "
                   << shape_str(data);
      return MX_FAIL;
    }
  }
  const int64_t n = data[0], c = data[1], width = data[2];
  if (c % p.num_group) {
    MX_ERROR_MSG << "num_group (" << p.num_group << ") must divide data's channels (" << c
                 << ")";
    return MX_FAIL;
  }
  const int64_t extent = p.dilate * (p.kernel - 1) + 1;
  if (width + 2 * p.pad < extent) {
    MX_ERROR_MSG << "kernel (dilated extent " << extent << ") is larger than the padded width ("
                 << width << " + 2*" << p.pad << ") of data";
    return MX_FAIL;
  }
  std::vector<unsigned> weight = {static_cast<unsigned>(p.num_filter),
                                  static_cast<unsigned>(c / p.num_group),
                                  static_cast<unsigned>(p.kernel)};
  const auto& given = (*in)[1];
  if (!given.empty()) {
    bool ok = given.size() == 3;
    for (size_t i = 0; ok && i < 3; ++i) ok = !dim_known(given[i]) || given[i] == weight[i];
    if (!ok) {
      MX_ERROR_MSG << "weight must have shape " << shape_str(weight) << " for data of shape "
                   << shape_str(data) << ", got " << shape_str(given);
      return MX_FAIL;
    }
  }
  (*in)[1] = weight;
  std::vector<unsigned> channel = {static_cast<unsigned>(p.num_filter)};
  for (size_t i = 2; i < in->size(); ++i) {
    const auto& s = (*in)[i];
    if (!s.empty() && !(s.size() == 1 && (!dim_known(s[0]) || s[0] == channel[0]))) {
      MX_ERROR_MSG << names[i] << " must have shape " << shape_str(channel) << ", got "
                   << shape_str(s);
      return MX_FAIL;
    }
    (*in)[i] = channel;
  }
  (*out)[0] = {static_cast<unsigned>(n), static_cast<unsigned>(p.num_filter),
               static_cast<unsigned>(conv_out_width(width, p))};
  return MX_SUCCESS;
}

fusedres::Conv1dShape conv_shape(const ConvParams& p, const MXTensor& data,
                                 const MXTensor& weight) {
  fusedres::Conv1dShape s;
  s.N = data.shape[0];
  s.Cin = data.shape[1];
  s.L = data.shape[2];
  s.Cout = weight.shape[0];
  s.K = weight.shape[2];
  s.stride = p.stride;
  s.pad = p.pad;
  s.dilation = p.dilate;
  s.groups = p.num_group;
  return s;
}

// Saved tensors (z is as large as the output) live in the op state from a training forward to
// its backward; a state is created per call, so a fresh allocation per call would page-fault
// (and std::vector would also zero it). Freed buffers are kept in a small pool and reused.
class BufferPool {
 public:
  static BufferPool& get() {
    static BufferPool* pool = new BufferPool();  // never destroyed: states may outlive statics
    return *pool;
  }
  void* acquire(size_t bytes, size_t* capacity) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].first >= bytes && (best == free_.size() || free_[i].first < free_[best].first))
        best = i;
    if (best < free_.size()) {
      auto b = free_[best];
      free_.erase(free_.begin() + best);
      *capacity = b.first;
      return b.second;
    }
    *capacity = bytes;
    return std::malloc(bytes ? bytes : 1);
  }
  void release(void* p, size_t capacity) {
    if (p == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < kMaxFree) {
      free_.emplace_back(capacity, p);
      return;
    }
    // Full: drop the smallest, keep the larger.
    size_t smallest = 0;
    for (size_t i = 1; i < free_.size(); ++i)
      if (free_[i].first < free_[smallest].first) smallest = i;
    if (free_[smallest].first < capacity) std::swap(free_[smallest].second, p),
                                          std::swap(free_[smallest].first, capacity);
    std::free(p);
  }

 private:
  static constexpr size_t kMaxFree = 16;
  std::mutex mu_;
  std::vector<std::pair<size_t, void*>> free_;
};

class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { BufferPool::get().release(ptr_, cap_); }
  void reserve(size_t bytes) {
    if (ptr_ != nullptr && cap_ >= bytes) return;
    BufferPool::get().release(ptr_, cap_);
    ptr_ = BufferPool::get().acquire(bytes, &cap_);
  }
  void* data() const { return ptr_; }
  template <typename T>
  const T* as() const { return static_cast<const T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t cap_ = 0;
};

class ConvBNReLUState : public CustomStatefulOp {
 public:
  ConvBNReLUState(const ConvParams& p, bool is_train, bool recording)
      : p_(p), is_train_(is_train), recording_(recording) {}

  MXReturnValue Forward(std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                        const OpResource&) override {
    clear_errors();
    if ((*inputs)[0].dtype == kFloat64) return forward<double>(*inputs, *outputs);
    if ((*inputs)[0].dtype == kFloat32) return forward<float>(*inputs, *outputs);
    MX_ERROR_MSG << "data must be float32 or float64, got " << dtype_name((*inputs)[0].dtype);
    return MX_FAIL;
  }

  // inputs: dy, data, weight, [bias], gamma, beta, running_mean, running_var, y
  // outputs: ddata, dweight, [dbias], dgamma, dbeta, (d running_mean, d running_var: unused)
  MXReturnValue Backward(std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                         const OpResource&) override {
    clear_errors();
    if (!recording_) {
      // The legacy executor (Symbol.bind, Module) creates the state once, outside autograd,
      // so the forward it ran was the inference one whatever is_train said: refuse to train.
      MX_ERROR_MSG << "the native " << kConvOp << " was bound outside autograd (Symbol.bind or "
                   << "Module), where it cannot tell training from inference; train such "
                   << "graphs with the CustomOp fusedres_conv1d_bn_relu (build or export the "
                   << "model with FUSEDRES_NATIVE=0)";
      return MX_FAIL;
    }
    if ((*inputs)[1].dtype == kFloat64) return backward<double>(*inputs, *outputs);
    if ((*inputs)[1].dtype == kFloat32) return backward<float>(*inputs, *outputs);
    MX_ERROR_MSG << "data must be float32 or float64, got " << dtype_name((*inputs)[1].dtype);
    return MX_FAIL;
  }

 private:
  template <typename T>
  T* saved(Buffer* buf, int64_t count) {
    buf->reserve(static_cast<size_t>(count) * sizeof(T));
    return reinterpret_cast<T*>(buf->data());
  }

  template <typename T>
  void forward_train(const std::vector<MXTensor>& in, int off, T* y, bool batch_stats) {
    auto& ins = const_cast<std::vector<MXTensor>&>(in);
    const auto s = conv_shape(p_, ins[off], ins[off + 1]);
    const int nb = p_.no_bias ? 0 : 1;
    const T* bias = p_.no_bias ? nullptr : ins[off + 2].data<T>();
    T* z = saved<T>(&z_, s.N * s.Cout * s.Lout());
    T* mean = saved<T>(&mean_, s.Cout);
    T* invstd = saved<T>(&invstd_, s.Cout);
    fusedres::conv1d_bn_relu_forward_train<T>(
        s, ins[off].data<T>(), ins[off + 1].data<T>(), bias, ins[off + 2 + nb].data<T>(),
        ins[off + 3 + nb].data<T>(), ins[off + 4 + nb].data<T>(), ins[off + 5 + nb].data<T>(),
        p_.eps, p_.momentum, batch_stats, z, mean, invstd, y, p_.relu);
    have_saved_ = true;
    batch_stats_ = batch_stats;
  }

  template <typename T>
  MXReturnValue forward(std::vector<MXTensor>& in, std::vector<MXTensor>& out) {
    T* y = out[0].data<T>();
    if (is_train_) {
      forward_train<T>(in, 0, y, !p_.use_global_stats);
    } else {
      // Inference: batchnorm folded into the conv, one pass, nothing kept.
      const auto s = conv_shape(p_, in[0], in[1]);
      const int nb = p_.no_bias ? 0 : 1;
      const T* bias = p_.no_bias ? nullptr : in[2].data<T>();
      fusedres::conv1d_bn_relu_forward_infer<T>(
          s, in[0].data<T>(), in[1].data<T>(), bias, in[2 + nb].data<T>(), in[3 + nb].data<T>(),
          in[4 + nb].data<T>(), in[5 + nb].data<T>(), p_.eps, y, p_.relu);
      have_saved_ = false;
    }
    return MX_SUCCESS;
  }

  template <typename T>
  MXReturnValue backward(std::vector<MXTensor>& in, std::vector<MXTensor>& out) {
    const auto s = conv_shape(p_, in[1], in[2]);
    if (!have_saved_) {
      // Backward after an inference-mode forward (recorded with train_mode=False): the
      // gradient is taken at the running statistics, which that forward used.
      Buffer scratch;
      forward_train<T>(in, 1, saved<T>(&scratch, s.N * s.Cout * s.Lout()), false);
    }
    const int nb = p_.no_bias ? 0 : 1;
    fusedres::conv1d_bn_relu_backward<T>(
        s, batch_stats_, in[0].data<T>(), in[1].data<T>(), in[2].data<T>(),
        z_.as<T>(), in[3 + nb].data<T>(), in[4 + nb].data<T>(), mean_.as<T>(), invstd_.as<T>(),
        out[0].data<T>(), out[1].data<T>(), p_.no_bias ? nullptr : out[2].data<T>(),
        out[2 + nb].data<T>(), out[3 + nb].data<T>(), p_.relu);
    // The saved tensors stay: a second backward (retain_graph=True) needs them again; they
    // go with the state when MXNet drops the recorded graph.
    return MX_SUCCESS;
  }

  ConvParams p_;
  bool is_train_, recording_;
  bool have_saved_ = false, batch_stats_ = false;
  Buffer z_, mean_, invstd_;
};

MXReturnValue conv_create_state(const Attrs& attrs, const MXContext& ctx,
                                const std::vector<std::vector<unsigned>>&,
                                const std::vector<int>, CustomStatefulOp** op) {
  clear_errors();
  ConvParams p;
  if (!parse_conv(attrs, &p)) return MX_FAIL;
  if (ctx.dev_type != "cpu") {
    MX_ERROR_MSG << "data is on " << ctx.dev_type << "(" << ctx.dev_id
                 << "): the native fusedres ops run on the CPU only";
    return MX_FAIL;
  }
  *op = CustomStatefulOp::create<ConvBNReLUState>(p, caller_flag(g_is_training),
                                                  caller_flag(g_is_recording));
  return MX_SUCCESS;
}

// ---------------------------------------------------------------- add + relu
const char* kAddOp = "_fusedres_add_relu";

MXReturnValue add_parse_attrs(const Attrs& attrs, int* num_in, int* num_out) {
  clear_errors();
  if (!check_known_attrs(attrs, {}, kAddOp)) return MX_FAIL;
  *num_in = 2;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue add_infer_type(const Attrs&, std::vector<int>* in_types,
                             std::vector<int>* out_types) {
  clear_errors();
  return infer_same_float_type({"lhs", "rhs"}, in_types, out_types);
}

MXReturnValue add_infer_shape(const Attrs&, std::vector<std::vector<unsigned>>* in,
                              std::vector<std::vector<unsigned>>* out) {
  clear_errors();
  auto& lhs = (*in)[0];
  auto& rhs = (*in)[1];
  const char* names[2] = {"lhs", "rhs"};
  for (int i = 0; i < 2; ++i) {
    for (unsigned d : (*in)[i]) {
      if (d == 0) {
        MX_ERROR_MSG << names[i] << " must have no zero-size dimension, got shape "
                     << shape_str((*in)[i]);
        return MX_FAIL;
      }
    }
  }
  if (shape_known(lhs) && shape_known(rhs) && lhs != rhs) {
    MX_ERROR_MSG << "rhs must have the same shape as lhs " << shape_str(lhs) << ", got "
                 << shape_str(rhs) << " (add_relu does not broadcast)";
    return MX_FAIL;
  }
  const auto& shape = shape_known(lhs) ? lhs : rhs;
  if (!shape_known(shape)) {
    MX_ERROR_MSG << "the shape of lhs or rhs must be known";
    return MX_FAIL;
  }
  lhs = rhs = shape;
  (*out)[0] = shape;
  return MX_SUCCESS;
}

MXReturnValue add_forward(const Attrs&, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                          const OpResource&) {
  clear_errors();
  const int64_t n = (*in)[0].size();
  if ((*in)[0].dtype == kFloat32) {
    fusedres::add_relu_forward<float>(n, (*in)[0].data<float>(), (*in)[1].data<float>(),
                                      (*out)[0].data<float>());
  } else if ((*in)[0].dtype == kFloat64) {
    fusedres::add_relu_forward<double>(n, (*in)[0].data<double>(), (*in)[1].data<double>(),
                                       (*out)[0].data<double>());
  } else {
    MX_ERROR_MSG << "lhs must be float32 or float64, got " << dtype_name((*in)[0].dtype);
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

// inputs: dy, lhs, rhs, y; outputs: dlhs, drhs
MXReturnValue add_backward(const Attrs&, std::vector<MXTensor>* in,
                           std::vector<MXTensor>* out, const OpResource&) {
  clear_errors();
  const int64_t n = (*in)[0].size();
  if ((*in)[0].dtype == kFloat32) {
    fusedres::add_relu_backward<float>(n, (*in)[0].data<float>(), (*in)[3].data<float>(),
                                       (*out)[0].data<float>(), (*out)[1].data<float>());
  } else if ((*in)[0].dtype == kFloat64) {
    fusedres::add_relu_backward<double>(n, (*in)[0].data<double>(), (*in)[3].data<double>(),
                                        (*out)[0].data<double>(), (*out)[1].data<double>());
  } else {
    MX_ERROR_MSG << "lhs must be float32 or float64, got " << dtype_name((*in)[0].dtype);
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(_fusedres_conv1d_bn_relu)
.setParseAttrs(conv_parse_attrs)
.setInferType(conv_infer_type)
.setInferShape(conv_infer_shape)
.setMutateInputs(conv_mutate_inputs)
.setCreateOpState(conv_create_state, "cpu");

REGISTER_OP(_fusedres_add_relu)
.setParseAttrs(add_parse_attrs)
.setInferType(add_infer_type)
.setInferShape(add_infer_shape)
.setForward(add_forward, "cpu")
.setBackward(add_backward, "cpu");

MXReturnValue initialize(int version) {
  if (version < 10900) {
    MX_ERROR_MSG << "fusedres's native ops need MXNet >= 1.9.0, got version " << version;
    return MX_FAIL;
  }
  if (!lookup_is_training()) {
    MX_ERROR_MSG << "fusedres's native ops could not find MXAutogradIsTraining/IsRecording in the "
                 << "loaded libmxnet; they cannot tell training from inference";
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

// For fusedres/ops/native.py: whether initialize() found MXNet's training flag.
extern "C" __attribute__((visibility("default"))) int fusedres_mxop_is_training_hooked() {
  return g_is_training != nullptr;
}
