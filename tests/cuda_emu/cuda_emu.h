// CPU emulation of the CUDA execution model, for running csrc/cuda/*.cu unmodified as C++ in
// the tests (tests/cuda_emu/build.py force-includes this header; include/cuda_fp16.h is a shim).
//
// Model: a launch hands blocks to worker OS threads, one block at a time per worker. Each CUDA
// thread of the block is a fiber (own stack, allocated once per worker) that runs until it
// reaches a barrier or returns; nothing preempts it. A warp runs alone until every live lane has
// stopped at __syncthreads or returned: its lanes run in lane order, and a warp operation
// (shuffle, __syncwarp) completes when every lane of its mask has arrived there. Then the next
// warp runs; the schedule gives the order of warps (plain, or reversed, which also reverses the
// order of blocks). A block barrier completes when every thread that has not returned waits at
// it; returned threads leave the block's and the warp's counts. Static __shared__ variables are
// thread_local: a worker runs one block at a time and fibers never move between workers.
//
// Checks (a failed one aborts the launch with a message): block shape and grid limits, launch
// bounds, __syncthreads reached from different source lines, a shuffle reading a lane that has
// returned, does not exist or is outside the mask, lanes of one mask disagreeing on the
// operation, deadlock.
#pragma once

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include <atomic>
#include <cstddef>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Language

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static thread_local
#define __launch_bounds__(...)

#ifdef CUEMU_SCAN  // build.py's preprocessing pass: leave markers it can find
#undef __global__
#define __global__ __cuemu_global__
#undef __launch_bounds__
#define __launch_bounds__(...) __cuemu_launch_bounds__(__VA_ARGS__)
#endif

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Fibers: a context switch saving the callee-saved registers and the stack pointer (x86-64
// System V), or glibc's ucontext elsewhere (or with -DCUEMU_UCONTEXT; a syscall per switch).

#if defined(__x86_64__) && !defined(CUEMU_UCONTEXT)
extern "C" void cuemu_swap(void** save_sp, void* load_sp);
extern "C" void cuemu_fiber_start();
asm(R"(
  .text
  .p2align 4
  .globl cuemu_swap
  .hidden cuemu_swap
  .type cuemu_swap, @function
cuemu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_swap, .-cuemu_swap
  .globl cuemu_fiber_start
  .hidden cuemu_fiber_start
  .type cuemu_fiber_start, @function
cuemu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size cuemu_fiber_start, .-cuemu_fiber_start
)");
namespace cuemu {
struct Context {
  void* sp;
};
inline void make_context(Context& c, char* stack, size_t size, void (*fn)(void*), void* arg) {
  // Popped by cuemu_swap: r15 r14 r13 r12 rbx rbp, then the return address. After the ret,
  // rsp = top - 16 is 16-byte aligned for the call in cuemu_fiber_start.
  const uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top - 72);
  sp[0] = sp[1] = sp[4] = sp[5] = nullptr;
  sp[2] = reinterpret_cast<void*>(fn);
  sp[3] = arg;
  sp[6] = reinterpret_cast<void*>(&cuemu_fiber_start);
  c.sp = sp;
}
inline void switch_context(Context& from, Context& to) { cuemu_swap(&from.sp, to.sp); }
}  // namespace cuemu
#else
#include <ucontext.h>
namespace cuemu {
struct Context {
  ucontext_t uc;
};
inline void fiber_start_split(unsigned hi_fn, unsigned lo_fn, unsigned hi_arg, unsigned lo_arg) {
  auto fn = reinterpret_cast<void (*)(void*)>((uintptr_t(hi_fn) << 32) | lo_fn);
  fn(reinterpret_cast<void*>((uintptr_t(hi_arg) << 32) | lo_arg));
}
inline void make_context(Context& c, char* stack, size_t size, void (*fn)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  const uint64_t f = reinterpret_cast<uintptr_t>(fn), a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(&fiber_start_split), 4, unsigned(f >> 32),
              unsigned(f), unsigned(a >> 32), unsigned(a));
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
}  // namespace cuemu
#endif

// ---------------------------------------------------------------------------------------------
// Scheduler

namespace cuemu {

enum State : uint8_t { kReady, kAtSync, kAtWarp, kDone };
enum WarpOpKind : int { kSyncwarp, kShflIdx, kShflUp, kShflDown, kShflXor };
inline const char* op_name(int kind) {
  static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                "__shfl_xor_sync"};
  return names[kind];
}

struct Site {
  const char* file;
  int line;
};

struct Thread {
  Context ctx;
  uint3 idx;
  int warp;
  State state;
  Site site;  // where it waits
  int op, width, arg;
  unsigned mask;
  uint64_t value, result;  // a shuffle's operand and result, as bits
};

struct Launch {
  void (*thunk)(void**);
  void** args;
  dim3 grid, block;
  bool reverse;
  long long nblocks;
  std::atomic<long long> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  char error[1024] = {0};
};

constexpr size_t kStackSize = 64 * 1024, kGuard = 4096;

struct Worker {
  Context sched;
  std::vector<Thread> threads;
  char* stacks = nullptr;
  size_t nstacks = 0;
  Launch* launch = nullptr;
  uint3 block_idx;
  bool failed = false;

  bool reserve(size_t n) {  // stacks for n fibers, each above a guard page; kept across launches
    if (n <= nstacks) return true;
    if (stacks) munmap(stacks, nstacks * (kStackSize + kGuard));
    const size_t each = kStackSize + kGuard;
    void* p = mmap(nullptr, n * each, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      stacks = nullptr;
      nstacks = 0;
      return false;
    }
    stacks = static_cast<char*>(p);
    for (size_t i = 0; i < n; ++i) mprotect(stacks + i * each, kGuard, PROT_NONE);
    nstacks = n;
    threads.resize(n);
    return true;
  }
  char* stack(size_t i) { return stacks + i * (kStackSize + kGuard) + kGuard; }
};

inline thread_local Worker* tl_worker = nullptr;
inline thread_local Thread* tl_thread = nullptr;

// Records the launch's first error and abandons the calling fiber (kernels hold no resources).
__attribute__((format(printf, 1, 2))) inline void fail(const char* fmt, ...) {
  Worker* w = tl_worker;
  Launch* l = w->launch;
  {
    std::lock_guard<std::mutex> g(l->mu);
    if (!l->failed.load()) {
      char msg[768];
      va_list ap;
      va_start(ap, fmt);
      vsnprintf(msg, sizeof msg, fmt, ap);
      va_end(ap);
      snprintf(l->error, sizeof l->error, "block (%u,%u,%u): %s", w->block_idx.x, w->block_idx.y,
               w->block_idx.z, msg);
      l->failed.store(true);
    }
  }
  w->failed = true;
  if (tl_thread) {
    Thread* t = tl_thread;
    t->state = kDone;
    switch_context(t->ctx, w->sched);
  }
}

inline void fiber_main(void* p) {
  Thread* t = static_cast<Thread*>(p);
  Worker* w = tl_worker;
  w->launch->thunk(w->launch->args);
  t->state = kDone;
  switch_context(t->ctx, w->sched);
}

inline void wait(State s, Site site) {
  Thread* t = tl_thread;
  t->state = s;
  t->site = site;
  switch_context(t->ctx, tl_worker->sched);
}

inline void resume(Worker& w, Thread& t) {
  tl_thread = &t;
  switch_context(w.sched, t.ctx);
  tl_thread = nullptr;
}

inline void describe(const Thread& t, char* buf, size_t n) {
  const char* what = t.state == kAtSync ? "__syncthreads" : op_name(t.op);
  snprintf(buf, n, "thread (%u,%u,%u) waits at %s (%s:%d)", t.idx.x, t.idx.y, t.idx.z, what,
           t.site.file, t.site.line);
}

// Completes the warp operations whose lanes have all arrived; returns how many lanes it freed.
// As in CUDA, lanes of the mask that have returned (or do not exist: a partial warp) are not
// waited for; reading one is an error, since CUDA leaves the value undefined. Lanes of one mask
// must agree on the operation, its width and its mask.
inline int release_warp_ops(Thread* lanes, int nlanes) {
  unsigned live = 0, waiting = 0;
  for (int i = 0; i < nlanes; ++i) {
    if (lanes[i].state != kDone) live |= 1u << i;
    if (lanes[i].state == kAtWarp) waiting |= 1u << i;
  }
  int freed = 0;
  for (int i = 0; i < nlanes; ++i) {
    Thread& t = lanes[i];
    if (t.state != kAtWarp) continue;
    if (!(t.mask & (1u << i))) {
      fail("thread (%u,%u,%u): %s (%s:%d) with mask 0x%08x, which does not name the thread",
           t.idx.x, t.idx.y, t.idx.z, op_name(t.op), t.site.file, t.site.line, t.mask);
      return -1;
    }
    const unsigned group = t.mask & live;
    if ((group & waiting) != group) continue;  // some lane of the mask is still running
    for (int j = 0; j < nlanes; ++j) {
      const Thread& u = lanes[j];
      if (!(group & (1u << j))) continue;
      if (u.op != t.op || u.mask != t.mask || u.width != t.width) {
        fail(
            "lanes %d and %d of warp %d meet at different warp operations: %s (%s:%d) mask "
            "0x%08x width %d, and %s (%s:%d) mask 0x%08x width %d",
            i, j, t.warp, op_name(t.op), t.site.file, t.site.line, t.mask, t.width, op_name(u.op),
            u.site.file, u.site.line, u.mask, u.width);
        return -1;
      }
    }
    // Exchange as PTX shfl.sync defines it: c = ((32 - width) << 8) | clamp.
    for (int j = 0; j < nlanes; ++j) {
      Thread& u = lanes[j];
      if (!(group & (1u << j)) || u.op == kSyncwarp) continue;
      const int segmask = (32 - u.width) & 31;
      const int clamp = u.op == kShflUp ? 0 : 31;
      const int max_lane = (j & segmask) | (clamp & ~segmask);
      const int min_lane = j & segmask;
      int src;
      bool ok;
      switch (u.op) {
        case kShflUp:
          src = j - u.arg;
          ok = src >= max_lane;
          break;
        case kShflDown:
          src = j + u.arg;
          ok = src <= max_lane;
          break;
        case kShflXor:
          src = j ^ u.arg;
          ok = src <= max_lane;
          break;
        default:
          src = min_lane | (u.arg & ~segmask);
          ok = src <= max_lane;
          break;
      }
      if (!ok) src = j;
      if (!(group & (1u << src))) {
        fail("thread (%u,%u,%u): %s (%s:%d) reads lane %d, which %s", u.idx.x, u.idx.y, u.idx.z,
             op_name(u.op), u.site.file, u.site.line, src,
             src >= nlanes               ? "does not exist (partial warp)"
             : lanes[src].state == kDone ? "has returned"
                                         : "is outside the mask");
        return -1;
      }
      u.result = lanes[src].value;
    }
    for (int j = 0; j < nlanes; ++j)
      if (group & (1u << j)) {
        lanes[j].state = kReady;
        waiting &= ~(1u << j);
        ++freed;
      }
  }
  return freed;
}

// Runs warp wi until each of its live lanes waits at __syncthreads or has returned.
inline bool run_warp(Worker& w, int wi, int nthreads) {
  Thread* lanes = &w.threads[size_t(wi) * 32];
  const int nlanes = nthreads - wi * 32 < 32 ? nthreads - wi * 32 : 32;
  for (;;) {
    for (int i = 0; i < nlanes; ++i) {
      if (lanes[i].state == kReady) resume(w, lanes[i]);
      if (w.failed) return false;
    }
    int at_warp = 0, at_sync = -1;
    for (int i = 0; i < nlanes; ++i) {
      if (lanes[i].state == kAtWarp) ++at_warp;
      if (lanes[i].state == kAtSync && at_sync < 0) at_sync = i;
    }
    if (at_warp == 0) return true;
    const int freed = release_warp_ops(lanes, nlanes);
    if (freed < 0) return false;
    if (freed == 0) {
      char a[256] = "", b[256] = "";
      for (int i = 0; i < nlanes; ++i)
        if (lanes[i].state == kAtWarp) {
          describe(lanes[i], a, sizeof a);
          break;
        }
      if (at_sync >= 0) describe(lanes[at_sync], b, sizeof b);
      fail("deadlock in warp %d: %s%s%s", wi, a, at_sync >= 0 ? ", while " : "", b);
      return false;
    }
  }
}

inline bool run_block(Worker& w, long long linear) {
  Launch& l = *w.launch;
  const dim3 g = l.grid, b = l.block;
  w.block_idx = {unsigned(linear % g.x), unsigned(linear / g.x % g.y),
                 unsigned(linear / (long long)(g.x * g.y))};
  const int n = int(b.x * b.y * b.z), nwarps = (n + 31) / 32;
  for (int i = 0; i < n; ++i) {
    Thread& t = w.threads[i];
    t.idx = {unsigned(i % b.x), unsigned(i / b.x % b.y), unsigned(i / (b.x * b.y))};
    t.warp = i >> 5;
    t.state = kReady;
    make_context(t.ctx, w.stack(i), kStackSize, &fiber_main, &t);
  }
  for (;;) {
    for (int k = 0; k < nwarps; ++k)
      if (!run_warp(w, l.reverse ? nwarps - 1 - k : k, n)) return false;
    int live = 0;
    const Thread* first = nullptr;
    for (int i = 0; i < n; ++i) {
      const Thread& t = w.threads[i];
      if (t.state == kDone) continue;
      ++live;
      if (!first) {
        first = &t;
      } else if (t.site.line != first->site.line || strcmp(t.site.file, first->site.file)) {
        char a[256], c[256];
        describe(*first, a, sizeof a);
        describe(t, c, sizeof c);
        fail("threads of one block wait at different __syncthreads: %s, %s", a, c);
        return false;
      }
    }
    if (live == 0) return true;
    for (int i = 0; i < n; ++i)
      if (w.threads[i].state == kAtSync) w.threads[i].state = kReady;
  }
}

inline void work(Worker& w, Launch& l) {
  tl_worker = &w;
  w.launch = &l;
  w.failed = false;
  for (;;) {
    if (l.failed.load()) break;
    const long long k = l.next.fetch_add(1);
    if (k >= l.nblocks) break;
    if (!run_block(w, l.reverse ? l.nblocks - 1 - k : k)) break;
  }
  tl_worker = nullptr;
}

inline std::mutex& launch_mutex() {
  static std::mutex mu;
  return mu;
}
inline std::vector<Worker*>& workers() {
  static std::vector<Worker*> ws;  // kept for the life of the module: stacks are reused
  return ws;
}

// The Python side's entry point (exported by build.py's generated code): 0, or 1 for a launch
// configuration CUDA would refuse, 2 for a failed check while the kernel ran; error says why.
inline int launch(void (*thunk)(void**), void** args, const unsigned* grid, const unsigned* block,
                  int max_threads, int reverse, int nworkers, char* error, int error_len) {
  auto bad = [&](const char* msg) {
    snprintf(error, error_len, "%s", msg);
    return 1;
  };
  const unsigned long long nthreads = 1ull * block[0] * block[1] * block[2];
  if (!grid[0] || !grid[1] || !grid[2] || !block[0] || !block[1] || !block[2])
    return bad("a grid or block dimension is 0");
  if (block[0] > 1024 || block[1] > 1024 || block[2] > 64 || nthreads > 1024)
    return bad("block exceeds 1024 threads (x, y <= 1024, z <= 64)");
  if (max_threads > 0 && nthreads > unsigned(max_threads))
    return bad("block exceeds the kernel's __launch_bounds__ (too many resources requested)");
  if (grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535)
    return bad("grid exceeds (2^31 - 1, 65535, 65535)");
  std::lock_guard<std::mutex> g(launch_mutex());
  Launch l;
  l.thunk = thunk;
  l.args = args;
  l.grid = dim3(grid[0], grid[1], grid[2]);
  l.block = dim3(block[0], block[1], block[2]);
  l.reverse = reverse != 0;
  l.nblocks = 1ll * grid[0] * grid[1] * grid[2];
  if (nworkers < 1) nworkers = 1;
  if (nworkers > l.nblocks) nworkers = int(l.nblocks);
  auto& ws = workers();
  while (int(ws.size()) < nworkers) ws.push_back(new Worker);
  for (int i = 0; i < nworkers; ++i)
    if (!ws[i]->reserve(nthreads)) return bad("cannot map fiber stacks");
  std::vector<std::thread> pool;
  for (int i = 1; i < nworkers; ++i) pool.emplace_back(work, std::ref(*ws[i]), std::ref(l));
  work(*ws[0], l);
  for (auto& t : pool) t.join();
  if (l.failed.load()) {
    snprintf(error, error_len, "%s", l.error);
    return 2;
  }
  return 0;
}

// Kernel entry points as build.py registers them: their parameter sizes and a thunk that calls
// the kernel with arguments unpacked from cuLaunchKernel-style pointers.
template <auto F>
struct Kernel;
template <class... A, void (*F)(A...)>
struct Kernel<F> {
  static constexpr int nparams = int(sizeof...(A));
  static void sizes(size_t* out) {
    const size_t s[] = {sizeof(A)..., 0};
    for (int i = 0; i < nparams; ++i) out[i] = s[i];
  }
  template <size_t... I>
  static void call(void** a, std::index_sequence<I...>) {
    F(*static_cast<std::remove_cv_t<A>*>(a[I])...);
  }
  static void thunk(void** a) { call(a, std::index_sequence_for<A...>{}); }
};

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of this type");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof v);
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof v);
  return v;
}

template <class T>
inline T warp_op(int kind, unsigned mask, T var, int arg, int width, Site site) {
  Thread* t = tl_thread;
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("%s (%s:%d): width %d is not a power of 2 in [1, 32]", op_name(kind), site.file, site.line,
         width);
  t->op = kind;
  t->mask = mask;
  t->width = width;
  t->arg = arg;
  t->value = to_bits(var);
  wait(kAtWarp, site);
  return from_bits<T>(t->result);
}

}  // namespace cuemu

// ---------------------------------------------------------------------------------------------
// Built-in variables and synchronization

#define threadIdx (::cuemu::tl_thread->idx)
#define blockIdx (::cuemu::tl_worker->block_idx)
#define blockDim (::cuemu::tl_worker->launch->block)
#define gridDim (::cuemu::tl_worker->launch->grid)

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cuemu::wait(::cuemu::kAtSync, {file, line});
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::cuemu::warp_op<int>(::cuemu::kSyncwarp, mask, 0, 0, 32, {file, line});
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuemu::warp_op(::cuemu::kShflIdx, mask, var, src_lane, width, {file, line});
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuemu::warp_op(::cuemu::kShflUp, mask, var, int(delta), width, {file, line});
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuemu::warp_op(::cuemu::kShflDown, mask, var, int(delta), width, {file, line});
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuemu::warp_op(::cuemu::kShflXor, mask, var, lane_mask, width, {file, line});
}

// ---------------------------------------------------------------------------------------------
// Arithmetic: the CUDA overloads of min/max, and rounding intrinsics (round-to-nearest-even,
// never contracted: build.py compiles with -ffp-contract=off, as these intrinsics promise).

#define CUEMU_MINMAX(T)                            \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
CUEMU_MINMAX(int)
CUEMU_MINMAX(unsigned)
CUEMU_MINMAX(long long)
CUEMU_MINMAX(unsigned long long)
#undef CUEMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }

// ---------------------------------------------------------------------------------------------
// __half: IEEE binary16 storage; conversions round to nearest even. Through the compiler's
// _Float16 where it has one, else in software (define CUEMU_SOFT_HALF to force that).

namespace cuemu {
#if defined(__FLT16_MANT_DIG__) && !defined(CUEMU_SOFT_HALF)
inline uint16_t float_to_half_bits(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  memcpy(&b, &h, 2);
  return b;
}
inline float half_bits_to_float(uint16_t b) {
  _Float16 h;
  memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
#else
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00u | uint16_t((x >> 13) & 0x1ffu);  // NaN, quiet
  if (x >= 0x47800000u) return sign | 0x7c00u;  // >= 65536: inf (65520 up rounds below)
  if (x < 0x38800000u) {  // below 2^-14: a subnormal half, f * 2^24 rounded to an integer
    float a;
    memcpy(&a, &x, 4);
    return sign | uint16_t(nearbyintf(a * 16777216.0f));
  }
  uint32_t h = ((x >> 23) - 112) << 10 | ((x >> 13) & 0x3ffu);
  const uint32_t rest = x & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;  // may carry into the exponent
  return sign | uint16_t(h);
}
inline float half_bits_to_float(uint16_t b) {
  const uint32_t sign = uint32_t(b & 0x8000u) << 16, e = (b >> 10) & 0x1fu, m = b & 0x3ffu;
  uint32_t x;
  if (e == 31) {
    x = sign | 0x7f800000u | (m << 13);
  } else if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    const float v = float(m) * (1.0f / 16777216.0f);
    memcpy(&x, &v, 4);
    x |= sign;
  } else {
    x = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  memcpy(&f, &x, 4);
  return f;
}
#endif
}  // namespace cuemu

struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(::cuemu::float_to_half_bits(f)) {}
  operator float() const { return ::cuemu::half_bits_to_float(__x); }
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half layout");

inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short b) {
  __half h;
  h.__x = b;
  return h;
}
// One half operation in float, rounded once: exact for + - * / (float has > 2 * 11 + 2 bits).
#define CUEMU_HALF_OP(OP) \
  inline __half operator OP(__half a, __half b) { return __half(float(a) OP float(b)); }
CUEMU_HALF_OP(+)
CUEMU_HALF_OP(-)
CUEMU_HALF_OP(*)
CUEMU_HALF_OP(/)
#undef CUEMU_HALF_OP
