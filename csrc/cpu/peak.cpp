// The machine's float32 multiply-add ceiling per instruction set, measured the way the
// kernels run (kernel_threads() threads, one parallel region): what the benchmarks report
// every row against.
#include <omp.h>

#include <chrono>
#include <cstdint>

#include "isa.h"
#include "threads.h"

namespace fusedres {

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512:
      return "avx512";
    case CpuIsa::avx2:
      return "avx2";
    default:
      return "generic";
  }
}

namespace {
int64_t fma_loop(CpuIsa isa, int64_t reps, float* sink) {
  switch (isa) {
    case CpuIsa::avx512:
      return isa_avx512::fma_loop(reps, sink);
    case CpuIsa::avx2:
      return isa_avx2::fma_loop(reps, sink);
    default:
      return isa_generic::fma_loop(reps, sink);
  }
}
}  // namespace

double fma_peak_gflops(CpuIsa isa, double seconds) {
  using clock = std::chrono::steady_clock;
  const CpuIsa best = cpu_isa();
  if (static_cast<int>(isa) > static_cast<int>(best)) isa = best;
  const ThreadScope threads;
  // Calibrate on the calling thread, then time every thread at once (repeated three times,
  // best kept: a neighbour's burst on a shared machine lowers a run, never raises it).
  float sink[3] = {1.0f, 1e-7f, 0.0f};
  int64_t reps = 1 << 12;
  for (;;) {
    const auto t0 = clock::now();
    fma_loop(isa, reps, sink);
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    if (dt > seconds / 30 || reps > (int64_t(1) << 40)) break;
    reps *= 2;
  }
  double best_rate = 0;
  for (int trial = 0; trial < 3; ++trial) {
    int64_t flops = 0;
    const auto t0 = clock::now();
#pragma omp parallel reduction(+ : flops)
    {
      float local[3] = {sink[0], sink[1], 0.0f};
      flops += fma_loop(isa, reps * 10, local);
      if (local[2] == 12345.0f) sink[2] = local[2];  // keeps the result observable
    }
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    const double rate = double(flops) / dt / 1e9;
    if (rate > best_rate) best_rate = rate;
  }
  return best_rate;
}

}  // namespace fusedres
