// How many threads the kernels' parallel regions use: OMP_NUM_THREADS when it is set, else
// every processor. Without OMP_NUM_THREADS, MXNet sets the OpenMP default of its worker
// threads (where its operators, and fusedres's, run) to half the processors, assuming
// hyper-threads (src/engine/openmp.cc): one thread of two here. The scope sets the calling
// thread's default for the kernel's duration and restores MXNet's afterwards.
#pragma once
#include <omp.h>

#include <cstdlib>

namespace fusedres {

inline int kernel_threads() {
  static const int n = [] {
    const char* env = std::getenv("OMP_NUM_THREADS");
    const int from_env = env ? std::atoi(env) : 0;  // "4" or "4,2": the first level
    return from_env > 0 ? from_env : omp_get_num_procs();
  }();
  return n;
}

class ThreadScope {
 public:
  ThreadScope() : previous_(omp_get_max_threads()) { omp_set_num_threads(kernel_threads()); }
  ~ThreadScope() { omp_set_num_threads(previous_); }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int previous_;
};

}  // namespace fusedres
