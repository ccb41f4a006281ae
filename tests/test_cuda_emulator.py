"""The CPU emulation of CUDA (tests/cuda_emu) against CUDA's semantics.

Tests of semantics (shuffles, barriers with early returns, half conversions) run on every CUDA
target, so that on a GPU the hardware checks the same expectations the emulation is held to.
Tests of the emulation's own checks and knobs run on the emulation only.
"""
import numpy as np
import pytest

SHUFFLES = r"""
#include <cuda_fp16.h>
// out[i * blockDim.x + t] = the i-th shuffle of v = 10 * t + 7; ops[i] = (kind, arg, width).
extern "C" __global__ void shuffles(const int* ops, int nops, int* out) {
  const int v = 10 * threadIdx.x + 7;
  for (int i = 0; i < nops; ++i) {
    const int kind = ops[3 * i], a = ops[3 * i + 1], width = ops[3 * i + 2];
    int r;
    if (kind == 0) r = __shfl_sync(0xffffffffu, v, a, width);
    else if (kind == 1) r = __shfl_up_sync(0xffffffffu, v, a, width);
    else if (kind == 2) r = __shfl_down_sync(0xffffffffu, v, a, width);
    else r = __shfl_xor_sync(0xffffffffu, v, a, width);
    out[i * blockDim.x + threadIdx.x] = r;
  }
}

// Threads at or past n return at once; the others reverse their block's values through shared
// memory, across a barrier the returned threads no longer count in.
extern "C" __global__ void early_return(int n, const float* x, float* y) {
  __shared__ float s[1024];
  const int t = threadIdx.x, base = blockIdx.x * n;
  if (t >= n) return;
  s[t] = x[base + t];
  __syncthreads();
  y[base + t] = s[n - 1 - t];
}

// Lanes at or past n return; the others shuffle, with a full mask.
extern "C" __global__ void shuffle_after_return(int n, int lane_mask, int* out) {
  if ((int)threadIdx.x >= n) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, lane_mask);
}

extern "C" __global__ void half_from_bits(long long n, const unsigned short* b, float* f) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    f[i] = __half2float(__ushort_as_half(b[i]));
}

extern "C" __global__ void half_to_bits(long long n, const float* f, unsigned short* b) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    b[i] = __half_as_ushort(__float2half_rn(f[i]));
}
"""


@pytest.fixture(scope="module")
def cp(cuda_target):
    return cuda_target[1]


@pytest.fixture(scope="module")
def emu(cuda_target):
    if cuda_target[0] == "gpu":
        pytest.skip("a check of the CUDA emulation itself")
    return cuda_target[1]


def _kernel(cp, name, code=SHUFFLES, options=("-std=c++17",)):
    from fusedres.cuda import loader  # the include directories the real kernels compile with
    options = tuple(options) + tuple(f"-I{d}" for d in loader.nvrtc_include_dirs())
    return cp.RawModule(code=code, options=options).get_function(name)


def _source_lane(kind, lane, a, width):
    """CUDA's documented semantics of __shfl*_sync over width-lane segments."""
    start = lane - lane % width
    if kind == 0:
        return start + a % width
    if kind == 1:
        return lane - a if lane - a >= start else lane
    if kind == 2:
        return lane + a if lane + a < start + width else lane
    return lane ^ a if (lane ^ a) < start + width else lane  # earlier segments are readable


def test_shuffles(cp):
    ops = [(k, a, w) for k in range(4) for w in (1, 2, 4, 8, 16, 32) for a in (0, 1, 3, 5, 16, 31)]
    out = cp.empty(len(ops) * 64, np.int32)
    _kernel(cp, "shuffles")((1,), (64,), (cp.asarray(np.array(ops, np.int32)),
                                          np.int32(len(ops)), out))
    got = cp.asnumpy(out).reshape(len(ops), 64)
    for i, (kind, a, width) in enumerate(ops):
        for t in range(64):
            src = 32 * (t // 32) + _source_lane(kind, t % 32, a, width)
            assert got[i, t] == 10 * src + 7, (["idx", "up", "down", "xor"][kind], a, width, t)


@pytest.mark.parametrize("n", [1, 31, 70, 96])
def test_returned_threads_leave_the_barrier(cp, n):
    x = np.random.default_rng(0).standard_normal(3 * n).astype(np.float32)
    y = cp.zeros(3 * n, np.float32)
    _kernel(cp, "early_return")((3,), (96,), (np.int32(n), cp.asarray(x), y))
    np.testing.assert_array_equal(cp.asnumpy(y), x.reshape(3, n)[:, ::-1].ravel())


def test_shuffles_among_lanes_left(cp):
    """A full-mask shuffle after some lanes returned: CUDA waits only for the lanes left."""
    out = cp.zeros(32, np.int32)
    _kernel(cp, "shuffle_after_return")((1,), (32,), (np.int32(20), np.int32(1), out))
    assert cp.asnumpy(out).tolist() == [t ^ 1 for t in range(20)] + [0] * 12


@pytest.mark.parametrize("options", [(), ("-DCUEMU_SOFT_HALF",)], ids=["native", "software"])
def test_half_conversions_round_to_nearest_even(cp, options):
    """Every half to float, and 2.1 million floats spread over all bit patterns to half, as
    numpy converts them (NaN to a NaN). CUEMU_SOFT_HALF: the emulation's software half, used
    where the compiler has no _Float16 (a CUDA compiler ignores the macro)."""
    options = ("-std=c++17",) + options
    bits = np.arange(1 << 16, dtype=np.uint16)
    f = cp.empty(bits.size, np.float32)
    _kernel(cp, "half_from_bits", options=options)((64,), (256,), (np.int64(bits.size),
                                                                   cp.asarray(bits), f))
    np.testing.assert_array_equal(cp.asnumpy(f), bits.view(np.float16).astype(np.float32))
    floats = np.arange(0, 1 << 32, 2039, dtype=np.uint64).astype(np.uint32).view(np.float32)
    h = cp.empty(floats.size, np.uint16)
    _kernel(cp, "half_to_bits", options=options)((256,), (256,), (np.int64(floats.size),
                                                                  cp.asarray(floats), h))
    with np.errstate(over="ignore"):  # floats beyond 65504 become inf, as they should
        want = floats.astype(np.float16)
    got = cp.asnumpy(h).view(np.float16)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


# --- the emulation's own checks -------------------------------------------------------------

CHECKS = r"""
extern "C" __global__ void split_barrier(int* out) {
  if (threadIdx.x < 32) __syncthreads();
  else __syncthreads();
  out[threadIdx.x] = 1;
}
extern "C" __global__ void widths_disagree(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1, threadIdx.x < 16 ? 16 : 32);
}
extern "C" __global__ void shuffle_meets_barrier(int* out) {
  if (threadIdx.x == 0) __syncthreads();
  else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}
extern "C" __global__ void __launch_bounds__(128) bounded(int* out) { out[threadIdx.x] = 1; }
extern "C" __global__ void write_n(long long n, float* out) {
  if (threadIdx.x == 0) out[n] = 1.f;
}
extern "C" __global__ void read_n(long long n, const float* in, float* out) {
  if (threadIdx.x == 0) out[0] = in[n];
}
// Unsynchronized on purpose: under the emulation, the order in which warps (and blocks) run.
extern "C" __global__ void warp_order(int* out) {
  __shared__ int next;
  if (threadIdx.x == 0) next = 0;
  __syncthreads();
  if (threadIdx.x % 32 == 0) out[blockIdx.x * 8 + next++] = threadIdx.x / 32;
  __syncthreads();
  if (threadIdx.x == 0) {
    const int k = out[20];
    out[16 + k] = blockIdx.x;
    out[20] = k + 1;
  }
}
"""


@pytest.mark.parametrize("kernel, block, args, match", [
    ("split_barrier", 64, (), "different __syncthreads"),
    ("shuffle_after_return", 32, (np.int32(20), np.int32(16)), "reads lane 20, which has "
                                                                 "returned"),
    ("shuffle_after_return", 48, (np.int32(48), np.int32(16)), "reads lane 16, which does not "
                                                                 "exist"),
    ("widths_disagree", 32, (), "different warp operations"),
    ("shuffle_meets_barrier", 32, (), "deadlock"),
])
def test_undefined_synchronization_fails_the_launch(emu, kernel, block, args, match):
    out = emu.zeros(block, np.int32)
    code = SHUFFLES if kernel == "shuffle_after_return" else CHECKS
    with pytest.raises(emu.CUDADriverError, match=match):
        _kernel(emu, kernel, code)((1,), (block,), args + (out,))


def test_launch_configuration_and_arguments_are_checked(emu):
    out = emu.zeros(1024, np.int32)
    fn = _kernel(emu, "bounded", CHECKS)
    fn((1,), (128,), (out,))
    with pytest.raises(emu.CUDADriverError, match="__launch_bounds__"):
        fn((1,), (129,), (out,))
    with pytest.raises(emu.CUDADriverError, match="1024 threads"):
        _kernel(emu, "split_barrier", CHECKS)((1,), (32, 33), (out,))
    with pytest.raises(emu.CUDADriverError, match="dimension is 0"):
        fn((0,), (32,), (out,))
    write = _kernel(emu, "write_n", CHECKS)
    with pytest.raises(TypeError, match="argument 0 is int32 of 4 bytes but the kernel's "
                                        "parameter 0 has 8 bytes"):
        write((1,), (1,), (np.int32(0), out))
    with pytest.raises(TypeError, match="takes 2 arguments, got 1"):
        write((1,), (1,), (out,))
    with pytest.raises(emu.CUDADriverError, match="named symbol not found"):
        emu.RawModule(code=CHECKS).get_function("no_such_kernel")


def test_out_of_bounds_writes_and_unwritten_reads_show(emu):
    a = emu.empty(10, np.float32)
    assert np.isnan(emu.asnumpy(a)).all()  # fresh memory is NaN, not zeros
    out = emu.zeros(1, np.float32)
    _kernel(emu, "read_n", CHECKS)((1,), (1,), (np.int64(10), a, out))  # just past the end
    assert np.isnan(emu.asnumpy(out)).all()
    write = _kernel(emu, "write_n", CHECKS)
    write((1,), (1,), (np.int64(9), a))
    for n in (10, -1):
        with pytest.raises(emu.CUDADriverError, match="ILLEGAL_ADDRESS.*40-byte"):
            write((1,), (1,), (np.int64(n), a))


@pytest.mark.parametrize("schedule, warps, blocks", [("plain", [0, 1, 2, 3], [0, 1]),
                                                     ("reverse", [3, 2, 1, 0], [1, 0])])
def test_schedules(emu, monkeypatch, schedule, warps, blocks):
    monkeypatch.setattr(emu.config, "schedule", schedule)
    monkeypatch.setattr(emu.config, "workers", 1)
    out = emu.zeros(24, np.int32)
    _kernel(emu, "warp_order", CHECKS)((2,), (128,), (out,))
    got = emu.asnumpy(out)
    assert got[:4].tolist() == warps and got[8:12].tolist() == warps
    assert got[16:18].tolist() == blocks


def test_ucontext_fibers(emu):
    """The portable fiber switch (glibc ucontext), used where there is no x86-64 one."""
    x = np.arange(70, dtype=np.float32)
    y = emu.zeros(70, np.float32)
    _kernel(emu, "early_return", options=("-DCUEMU_UCONTEXT",))((1,), (96,), (
        np.int32(70), emu.asarray(x), y))
    np.testing.assert_array_equal(emu.asnumpy(y), x[::-1])


def test_from_dlpack_views_host_memory(emu):
    """CPU DLPack capsules become emulated device arrays without a copy: kernels write through
    them into the producer's memory (numpy here; MXNet NDArrays below)."""
    x = np.arange(70, dtype=np.float32)
    y = np.zeros(70, np.float32)
    dy = emu.from_dlpack(y)
    _kernel(emu, "early_return")((1,), (96,), (np.int32(70), emu.from_dlpack(x), dy))
    np.testing.assert_array_equal(y, x[::-1])
    assert dy.flags.c_contiguous and dy.shape == (70,) and dy.device.id == 0


def test_from_dlpack_views_mxnet_arrays(emu):
    mx = pytest.importorskip("mxnet")
    x = mx.nd.arange(70, dtype="float32")
    y = mx.nd.zeros((70,), dtype="float32")
    dy = emu.from_dlpack(y.to_dlpack_for_write())
    _kernel(emu, "early_return")((1,), (96,), (
        np.int32(70), emu.from_dlpack(x.to_dlpack_for_read()), dy))
    del dy
    np.testing.assert_array_equal(y.asnumpy(), np.arange(70, dtype=np.float32)[::-1])


def test_arrays_behave_like_cupy(emu):
    a = emu.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones((3, 4), np.float32)
    assert not a[:, ::2].flags.c_contiguous
    b = a[1:]
    b += 1
    assert emu.asnumpy(a)[1:].tolist() == (np.arange(4, 12).reshape(2, 4) + 1).tolist()
    with emu.cuda.Device(1):
        assert emu.empty(3, np.float32).device.id == 1
    with pytest.raises(emu.CUDARuntimeError, match="invalid device ordinal"):
        with emu.cuda.Device(2):
            pass
