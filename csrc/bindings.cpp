// pybind11 module fusedres._C: argument checks, GIL release, docstrings; the math is in cpu/.
// Every check names the argument, so bad input becomes a ValueError/TypeError in Python
// instead of an out-of-bounds access inside a kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "conv_attrs.h"
#include "cpu/add_relu.h"
#include "cpu/conv1d_bn_relu.h"
#include "cpu/isa.h"
#include "cpu/pack_cache.h"
#include "cpu/threads.h"

namespace py = pybind11;
using fusedres::Conv1dShape;
using fusedres::shape_str;

namespace {

enum class DType { f32, f64 };

// A checked view of one numpy argument.
struct Arg {
  py::array arr;
  const char* name;
  Arg(py::array a, const char* n, bool writable) : arr(std::move(a)), name(n) {
    if (!(arr.flags() & py::array::c_style))
      throw py::value_error(std::string(name) + " must be C-contiguous");
    if (writable && !arr.writeable())
      throw py::value_error(std::string(name) + " must be writable");
  }
  DType dtype() const {
    if (arr.dtype().is(py::dtype::of<float>())) return DType::f32;
    if (arr.dtype().is(py::dtype::of<double>())) return DType::f64;
    throw py::type_error(std::string(name) + " must be float32 or float64, got " +
                         std::string(py::str(arr.dtype())));
  }
  std::vector<int64_t> shape() const {
    return std::vector<int64_t>(arr.shape(), arr.shape() + arr.ndim());
  }
  void expect(const std::vector<int64_t>& want) const {
    if (shape() != want)
      throw py::value_error(std::string(name) + " must have shape " + shape_str(want) + ", got " +
                            shape_str(shape()));
  }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(const_cast<void*>(arr.data()));
  }
};

std::optional<Arg> opt_arg(const std::optional<py::array>& a, const char* name, bool w) {
  if (!a) return std::nullopt;
  return Arg(*a, name, w);
}

template <typename T>
T* ptr_or_null(const std::optional<Arg>& a) {
  return a ? a->ptr<T>() : nullptr;
}

void same_dtype(DType d, const std::vector<const Arg*>& args) {
  for (const Arg* a : args)
    if (a && a->dtype() != d)
      throw py::type_error(std::string(a->name) + " must have the same dtype as data");
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}

// The checks of csrc/conv_attrs.h (data, weight and the hyper-parameters); returns the shape
// they imply.
Conv1dShape conv_shape(const Arg& x, const Arg& w, int64_t stride, int64_t pad, int64_t dilate,
                       int64_t num_group, double eps = 1e-5, double momentum = 0.9) {
  fusedres::ConvAttrs a;
  const std::string err = fusedres::check_kernel_call(x.shape(), w.shape(), stride, pad, dilate,
                                                      num_group, eps, momentum, &a);
  require(err.empty(), err);
  return fusedres::conv_shape(a, x.shape()[0], x.shape()[1], x.shape()[2]);
}

std::vector<int64_t> out_shape(const Conv1dShape& s) { return {s.N, s.Cout, s.Lout()}; }

void forward_train(py::array x_, py::array w_, std::optional<py::array> bias_, py::array gamma_,
                   py::array beta_, py::array rmean_, py::array rvar_, py::array z_,
                   py::array mean_, py::array invstd_, py::array y_, int64_t stride, int64_t pad,
                   int64_t dilate, int64_t num_group, double eps, double momentum, bool batch_stats,
                   bool relu) {
  Arg x(x_, "data", false), w(w_, "weight", false), gamma(gamma_, "gamma", false),
      beta(beta_, "beta", false), rmean(rmean_, "running_mean", batch_stats),
      rvar(rvar_, "running_var", batch_stats), z(z_, "saved conv output", true),
      mean(mean_, "saved mean", true), invstd(invstd_, "saved invstd", true), y(y_, "output", true);
  auto bias = opt_arg(bias_, "bias", false);
  const DType d = x.dtype();
  same_dtype(d,
             {&w, bias ? &*bias : nullptr, &gamma, &beta, &rmean, &rvar, &z, &mean, &invstd, &y});
  const Conv1dShape s = conv_shape(x, w, stride, pad, dilate, num_group, eps, momentum);
  for (const Arg* a : {bias ? &*bias : nullptr, &gamma, &beta, &rmean, &rvar, &mean, &invstd})
    if (a) a->expect({s.Cout});
  z.expect(out_shape(s));
  y.expect(out_shape(s));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    fusedres::conv1d_bn_relu_forward_train<T>(s, x.ptr<T>(), w.ptr<T>(), ptr_or_null<T>(bias),
                                              gamma.ptr<T>(), beta.ptr<T>(), rmean.ptr<T>(),
                                              rvar.ptr<T>(), eps, momentum, batch_stats, z.ptr<T>(),
                                              mean.ptr<T>(), invstd.ptr<T>(), y.ptr<T>(), relu);
  };
  py::gil_scoped_release release;
  if (d == DType::f32)
    run(float{});
  else
    run(double{});
}

void forward_infer(py::array x_, py::array w_, std::optional<py::array> bias_, py::array gamma_,
                   py::array beta_, py::array rmean_, py::array rvar_, py::array y_, int64_t stride,
                   int64_t pad, int64_t dilate, int64_t num_group, double eps, bool relu) {
  Arg x(x_, "data", false), w(w_, "weight", false), gamma(gamma_, "gamma", false),
      beta(beta_, "beta", false), rmean(rmean_, "running_mean", false),
      rvar(rvar_, "running_var", false), y(y_, "output", true);
  auto bias = opt_arg(bias_, "bias", false);
  const DType d = x.dtype();
  same_dtype(d, {&w, bias ? &*bias : nullptr, &gamma, &beta, &rmean, &rvar, &y});
  const Conv1dShape s = conv_shape(x, w, stride, pad, dilate, num_group, eps);
  for (const Arg* a : {bias ? &*bias : nullptr, &gamma, &beta, &rmean, &rvar})
    if (a) a->expect({s.Cout});
  y.expect(out_shape(s));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    fusedres::conv1d_bn_relu_forward_infer<T>(s, x.ptr<T>(), w.ptr<T>(), ptr_or_null<T>(bias),
                                              gamma.ptr<T>(), beta.ptr<T>(), rmean.ptr<T>(),
                                              rvar.ptr<T>(), eps, y.ptr<T>(), relu);
  };
  py::gil_scoped_release release;
  if (d == DType::f32)
    run(float{});
  else
    run(double{});
}

void backward(py::array dy_, py::array x_, py::array w_, py::array z_, py::array gamma_,
              py::array beta_, py::array mean_, py::array invstd_, std::optional<py::array> dx_,
              std::optional<py::array> dw_, std::optional<py::array> dbias_,
              std::optional<py::array> dgamma_, std::optional<py::array> dbeta_, int64_t stride,
              int64_t pad, int64_t dilate, int64_t num_group, bool batch_stats, bool relu) {
  Arg dy(dy_, "out_grad", false), x(x_, "data", false), w(w_, "weight", false),
      z(z_, "saved conv output", false), gamma(gamma_, "gamma", false), beta(beta_, "beta", false),
      mean(mean_, "saved mean", false), invstd(invstd_, "saved invstd", false);
  auto dx = opt_arg(dx_, "data_grad", true), dw = opt_arg(dw_, "weight_grad", true),
       dbias = opt_arg(dbias_, "bias_grad", true), dgamma = opt_arg(dgamma_, "gamma_grad", true),
       dbeta = opt_arg(dbeta_, "beta_grad", true);
  const DType d = x.dtype();
  auto p = [](std::optional<Arg>& a) -> Arg* { return a ? &*a : nullptr; };
  same_dtype(
      d, {&dy, &w, &z, &gamma, &beta, &mean, &invstd, p(dx), p(dw), p(dbias), p(dgamma), p(dbeta)});
  const Conv1dShape s = conv_shape(x, w, stride, pad, dilate, num_group);
  dy.expect(out_shape(s));
  z.expect(out_shape(s));
  for (const Arg* a : {&gamma, &beta, &mean, &invstd, p(dbias), p(dgamma), p(dbeta)})
    if (a) a->expect({s.Cout});
  if (dx) dx->expect(x.shape());
  if (dw) dw->expect(w.shape());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    fusedres::conv1d_bn_relu_backward<T>(
        s, batch_stats, dy.ptr<T>(), x.ptr<T>(), w.ptr<T>(), z.ptr<T>(), gamma.ptr<T>(),
        beta.ptr<T>(), mean.ptr<T>(), invstd.ptr<T>(), ptr_or_null<T>(dx), ptr_or_null<T>(dw),
        ptr_or_null<T>(dbias), ptr_or_null<T>(dgamma), ptr_or_null<T>(dbeta), relu);
  };
  py::gil_scoped_release release;
  if (d == DType::f32)
    run(float{});
  else
    run(double{});
}

void add_relu_fwd(py::array a_, py::array b_, py::array y_) {
  Arg a(a_, "lhs", false), b(b_, "rhs", false), y(y_, "output", true);
  const DType d = a.dtype();
  same_dtype(d, {&b, &y});
  require(a.shape() == b.shape(), "lhs and rhs must have the same shape, got " +
                                      shape_str(a.shape()) + " and " + shape_str(b.shape()));
  y.expect(a.shape());
  const int64_t n = a.arr.size();
  py::gil_scoped_release release;
  if (d == DType::f32)
    fusedres::add_relu_forward<float>(n, a.ptr<float>(), b.ptr<float>(), y.ptr<float>());
  else
    fusedres::add_relu_forward<double>(n, a.ptr<double>(), b.ptr<double>(), y.ptr<double>());
}

void add_relu_bwd(py::array dy_, py::array y_, std::optional<py::array> da_,
                  std::optional<py::array> db_) {
  Arg dy(dy_, "out_grad", false), y(y_, "output", false);
  auto da = opt_arg(da_, "lhs_grad", true), db = opt_arg(db_, "rhs_grad", true);
  const DType d = y.dtype();
  same_dtype(d, {&dy, da ? &*da : nullptr, db ? &*db : nullptr});
  dy.expect(y.shape());
  if (da) da->expect(y.shape());
  if (db) db->expect(y.shape());
  const int64_t n = y.arr.size();
  py::gil_scoped_release release;
  if (d == DType::f32)
    fusedres::add_relu_backward<float>(n, dy.ptr<float>(), y.ptr<float>(), ptr_or_null<float>(da),
                                       ptr_or_null<float>(db));
  else
    fusedres::add_relu_backward<double>(n, dy.ptr<double>(), y.ptr<double>(),
                                        ptr_or_null<double>(da), ptr_or_null<double>(db));
}

fusedres::CpuIsa isa_of(const std::optional<std::string>& name) {
  if (!name) return fusedres::cpu_isa();
  for (auto isa : {fusedres::CpuIsa::generic, fusedres::CpuIsa::avx2, fusedres::CpuIsa::avx512})
    if (*name == fusedres::isa_name(isa)) {
      if (static_cast<int>(isa) > static_cast<int>(fusedres::cpu_isa()))
        throw py::value_error("isa '" + *name + "' is not supported by this CPU (best: '" +
                              fusedres::isa_name(fusedres::cpu_isa()) + "')");
      return isa;
    }
  throw py::value_error("isa must be 'generic', 'avx2' or 'avx512', got '" + *name + "'");
}

double fma_peak(const std::optional<std::string>& isa, double seconds) {
  if (!(seconds > 0 && seconds <= 60))
    throw py::value_error("seconds must be in (0, 60], got " + std::to_string(seconds));
  const fusedres::CpuIsa which = isa_of(isa);
  py::gil_scoped_release release;
  return fusedres::fma_peak_gflops(which, seconds);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedres CPU kernels (float32, float64; NCW contiguous arrays, written in place)";
  m.def("kernel_threads", &fusedres::kernel_threads,
        "Threads of the kernels' parallel regions: $OMP_NUM_THREADS, else every processor "
        "(whatever OpenMP default MXNet gave the calling thread)");
  m.def(
      "cpu_isa", [] { return std::string(fusedres::isa_name(fusedres::cpu_isa())); },
      "Instruction set the kernels run with: the CPU's best, lowered by $FUSEDRES_CPU_ISA");
  m.def("fma_peak_gflops", &fma_peak, py::arg("isa") = py::none(), py::arg("seconds") = 0.3,
        "float32 multiply-add peak (GFLOP/s) of one instruction set ('generic', 'avx2', "
        "'avx512'; default: the kernels' own) on kernel_threads() threads, measured now");
  m.def(
      "pack_cache_stats",
      [] {
        size_t n = 0, bytes = 0;
        fusedres::pack_cache_stats(&n, &bytes);
        return py::make_tuple(n, bytes);
      },
      "(entries, bytes) of the inference forward's packed-weight cache (csrc/cpu/pack_cache.h)");
  m.def("pack_cache_clear", &fusedres::pack_cache_clear,
        "Drops the inference forward's cached packed weights");
  m.def("conv1d_bn_relu_forward_train", &forward_train, py::arg("data"), py::arg("weight"),
        py::arg("bias"), py::arg("gamma"), py::arg("beta"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("z"), py::arg("mean"), py::arg("invstd"), py::arg("out"),
        py::arg("stride"), py::arg("pad"), py::arg("dilate"), py::arg("num_group"), py::arg("eps"),
        py::arg("momentum"), py::arg("batch_stats"), py::arg("relu") = true,
        "Conv1d+BN+ReLU forward keeping z (conv output), mean and invstd for backward; "
        "relu=False leaves out the relu.");
  m.def("conv1d_bn_relu_forward_infer", &forward_infer, py::arg("data"), py::arg("weight"),
        py::arg("bias"), py::arg("gamma"), py::arg("beta"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("out"), py::arg("stride"), py::arg("pad"),
        py::arg("dilate"), py::arg("num_group"), py::arg("eps"), py::arg("relu") = true,
        "Conv1d+BN+ReLU inference with BN folded into the conv.");
  m.def("conv1d_bn_relu_backward", &backward, py::arg("out_grad"), py::arg("data"),
        py::arg("weight"), py::arg("z"), py::arg("gamma"), py::arg("beta"), py::arg("mean"),
        py::arg("invstd"), py::arg("data_grad"), py::arg("weight_grad"), py::arg("bias_grad"),
        py::arg("gamma_grad"), py::arg("beta_grad"), py::arg("stride"), py::arg("pad"),
        py::arg("dilate"), py::arg("num_group"), py::arg("batch_stats"), py::arg("relu") = true,
        "Conv1d+BN+ReLU backward; a None gradient is not computed.");
  m.def("add_relu_forward", &add_relu_fwd, py::arg("lhs"), py::arg("rhs"), py::arg("out"),
        "out = max(lhs + rhs, 0)");
  m.def("add_relu_backward", &add_relu_bwd, py::arg("out_grad"), py::arg("out"),
        py::arg("lhs_grad"), py::arg("rhs_grad"), "lhs_grad = rhs_grad = out_grad * (out > 0)");
}
