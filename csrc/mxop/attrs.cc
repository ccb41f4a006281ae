#include "mxop/attrs.h"

#include <cctype>
#include <sstream>
#include <stdexcept>

#include <dmlc/logging.h>
#include <mshadow/base.h>

#include "mxop/nnvm_bridge.h"

namespace fusedres {
namespace mxop {

namespace {

std::string strip(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\n"), e = s.find_last_not_of(" \t\n");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

// An int, or a 1-tuple/list of one int, as Python's str() writes them ("3", "(3,)", "[3]").
int64_t parse_int(const nnvm::NodeAttrs& attrs, const char* name, bool required, int64_t fallback) {
  const std::string* raw = find_attr(attrs, name);
  if (raw == nullptr) {
    if (required) fail("ValueError", std::string(name) + " is required");
    return fallback;
  }
  std::string s = strip(*raw);
  if (!s.empty() && (s.front() == '(' || s.front() == '[')) {
    const char close = s.front() == '(' ? ')' : ']';
    if (s.back() != close)
      fail("ValueError", std::string(name) + " must be an int or a 1-tuple, got " + *raw);
    s = strip(s.substr(1, s.size() - 2));
    if (!s.empty() && s.back() == ',') s = strip(s.substr(0, s.size() - 1));
    if (s.empty() || s.find(',') != std::string::npos)
      fail("ValueError", std::string(name) + " must be a single int or a 1-tuple, got " + *raw);
  }
  size_t pos = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &pos);
  } catch (const std::out_of_range&) {
    fail("ValueError",
         std::string(name) + " must be <= " + std::to_string(kMaxExtent) + ", got " + *raw);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (s.empty() || pos != s.size())
    fail("TypeError", std::string(name) + " must be an int, got '" + *raw + "'");
  return v;
}

double parse_float(const nnvm::NodeAttrs& attrs, const char* name, double fallback) {
  const std::string* raw = find_attr(attrs, name);
  if (raw == nullptr) return fallback;
  const std::string s = strip(*raw);
  size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(s, &pos);
  } catch (const std::out_of_range&) {
    fail("ValueError", std::string(name) + " is out of range: " + *raw);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (s.empty() || pos != s.size())
    fail("TypeError", std::string(name) + " must be a number, got '" + *raw + "'");
  return v;
}

bool parse_bool(const nnvm::NodeAttrs& attrs, const char* name, bool fallback) {
  const std::string* raw = find_attr(attrs, name);
  if (raw == nullptr) return fallback;
  std::string s = strip(*raw);
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s == "true" || s == "1") return true;
  if (s == "false" || s == "0") return false;
  fail("TypeError", std::string(name) + " must be a bool, got '" + *raw + "'");
}

// One of `choices`, as Python's str() writes the string (quotes allowed).
std::string parse_choice(const nnvm::NodeAttrs& attrs, const char* name,
                         const std::vector<std::string>& choices, const std::string& fallback) {
  const std::string* raw = find_attr(attrs, name);
  if (raw == nullptr) return fallback;
  std::string s = strip(*raw);
  if (s.size() >= 2 && (s.front() == '\'' || s.front() == '"') && s.back() == s.front())
    s = s.substr(1, s.size() - 2);
  std::string list;
  for (const auto& c : choices) {
    if (s == c) return s;
    list += (list.empty() ? "'" : ", '") + c + "'";
  }
  fail("ValueError", std::string(name) + " must be one of " + list + ", got '" + *raw + "'");
}

}  // namespace

void fail(const char* kind, const std::string& message) {
  throw dmlc::Error(std::string(kind) + ": " + message);
}

void check_known_attrs(const nnvm::NodeAttrs& attrs, const std::vector<std::string>& known,
                       const char* op) {
  for (const auto& kv : attrs.dict) {
    if (kv.first.compare(0, 2, "__") == 0) continue;
    bool ok = false;
    for (const auto& k : known) ok = ok || kv.first == k;
    if (!ok)
      fail("ValueError", std::string(op) + " got an unexpected attribute '" + kv.first + "'");
  }
}

ConvAttrs parse_conv_attrs(const nnvm::NodeAttrs& attrs) {
  check_known_attrs(attrs,
                    {"kernel", "num_filter", "stride", "pad", "dilate", "num_group", "no_bias",
                     "eps", "momentum", "use_global_stats", "relu"},
                    "_fusedres_conv1d_bn_relu");
  ConvAttrs a;
  a.num_filter = parse_int(attrs, "num_filter", true, 0);
  a.kernel = parse_int(attrs, "kernel", true, 0);
  a.stride = parse_int(attrs, "stride", false, a.stride);
  a.pad = parse_int(attrs, "pad", false, a.pad);
  a.dilate = parse_int(attrs, "dilate", false, a.dilate);
  a.num_group = parse_int(attrs, "num_group", false, a.num_group);
  a.no_bias = parse_bool(attrs, "no_bias", a.no_bias);
  a.use_global_stats = parse_bool(attrs, "use_global_stats", a.use_global_stats);
  a.relu = parse_bool(attrs, "relu", a.relu);
  a.eps = parse_float(attrs, "eps", a.eps);
  a.momentum = parse_float(attrs, "momentum", a.momentum);
  const std::string err = check_conv_attrs(a);
  if (!err.empty()) fail("ValueError", err);
  a.momentum = static_cast<double>(static_cast<float>(a.momentum));
  return a;
}

PoolAttrs parse_pool_attrs(const nnvm::NodeAttrs& attrs) {
  check_known_attrs(
      attrs, {"kernel", "stride", "pad", "pool_type", "pooling_convention", "count_include_pad"},
      "_fusedres_pool1d");
  PoolAttrs a;
  a.kernel = parse_int(attrs, "kernel", true, 0);
  a.stride = parse_int(attrs, "stride", false, a.stride);
  a.pad = parse_int(attrs, "pad", false, a.pad);
  a.max = parse_choice(attrs, "pool_type", {"max", "avg"}, "max") == "max";
  a.full = parse_choice(attrs, "pooling_convention", {"valid", "full"}, "valid") == "full";
  a.count_include_pad = parse_bool(attrs, "count_include_pad", a.count_include_pad);
  for (const auto& check : {std::make_pair("kernel", conv_int_error("kernel", a.kernel, 1)),
                            std::make_pair("stride", conv_int_error("stride", a.stride, 1)),
                            std::make_pair("pad", conv_int_error("pad", a.pad, 0))})
    if (!check.second.empty()) fail("ValueError", check.second);
  return a;
}

std::string shape_str(const mxnet::TShape& s) {
  if (!mxnet::ndim_is_known(s)) return "unknown";
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < s.ndim(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.ndim() == 1 ? ",)" : ")");
  return os.str();
}

const char* dtype_name(int t) {
  switch (t) {
    case mshadow::kFloat32:
      return "float32";
    case mshadow::kFloat64:
      return "float64";
    case mshadow::kFloat16:
      return "float16";
    case mshadow::kUint8:
      return "uint8";
    case mshadow::kInt32:
      return "int32";
    case mshadow::kInt8:
      return "int8";
    case mshadow::kInt64:
      return "int64";
    case mshadow::kBool:
      return "bool";
    default:
      return "an unsupported dtype";
  }
}

}  // namespace mxop
}  // namespace fusedres
