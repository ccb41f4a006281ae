// Where a kernel writes one output, honouring MXNet's OpReqType.
#pragma once
#include <cstdint>

#include <mxnet/op_attr_types.h>

#include "cpu/threads.h"
#include "mxop/buffer_pool.h"

namespace fusedres {
namespace mxop {

// kWriteTo / kWriteInplace: the kernel writes the output's memory. kAddTo: it writes scratch,
// which commit() adds to the output. kNullOp: not wanted (ptr() is null), unless the kernel
// must produce it anyway (ptr_always(): scratch that commit() drops).
template <typename T>
class Target {
 public:
  Target(const mxnet::TBlob& blob, mxnet::OpReqType req)
      : req_(req), dst_(static_cast<T*>(blob.dptr_)), n_(int64_t(blob.shape_.Size())) {}
  Target(const Target&) = delete;
  Target& operator=(const Target&) = delete;

  T* ptr() {
    if (req_ == mxnet::kNullOp) return nullptr;
    if (req_ == mxnet::kAddTo) return scratch_.get<T>(n_);
    return dst_;
  }
  T* ptr_always() { return req_ == mxnet::kNullOp ? scratch_.get<T>(n_) : ptr(); }

  void commit() {
    if (req_ != mxnet::kAddTo) return;
    const T* src = scratch_.as<T>();
    T* dst = dst_;
    const int64_t n = n_;
    const ThreadScope threads;
#pragma omp parallel for simd schedule(static) if (n > 32768)
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
  }

 private:
  mxnet::OpReqType req_;
  T* dst_;
  int64_t n_;
  Buffer scratch_;
};

}  // namespace mxop
}  // namespace fusedres
