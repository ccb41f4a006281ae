"""A stand-in for the parts of CuPy that fusedres.cuda and its tests use, on the CPU emulation.

Device arrays are NumPy arrays in host memory, wrapped so that they behave like CuPy's (no
implicit conversion to NumPy, a device id, ``.data.ptr``). ``empty`` fills new memory with NaN
bytes (0xff) and surrounds it with red zones of the same bytes: reads of unwritten memory show
as NaN, and a kernel writing past either end of an allocation fails its launch.
``RawModule(code=...)`` compiles the source against cuda_emu.h (build.py) and ``get_function``
returns kernels launched like CuPy's: ``kernel(grid, block, args)``, arguments converted as CuPy
converts them (arrays to pointers, None to a null pointer, Python int/float/bool to int64/
float64/bool) and then, unlike cuLaunchKernel, checked against the size of each parameter.
Launches are synchronous; streams exist only to be waited on.

``from_dlpack`` also takes CPU capsules (or objects with ``__dlpack__``): their host memory
becomes an emulated device array without a copy, so that arrays of a CPU framework (MXNet
NDArrays through ``to_dlpack_for_write``) can be handed to the kernels.

Knobs: ``config.schedule`` ("plain" or "reverse": warps, and blocks, in reverse order), default
from FUSEDRES_CUDA_EMU_SCHEDULE; ``config.workers`` (OS threads per launch), default from
FUSEDRES_CUDA_EMU_THREADS or the CPUs available; ``config.device_count`` (2, so that device
checks can be tested) and ``config.sm_count`` (4: small enough that grid-stride loops and split
reductions run more than one round on the tests' shapes).
"""
import contextlib
import ctypes
import os
import threading
import types
import weakref

import numpy as np

from . import build

__version__ = "emulator"


class _Config:
    def __init__(self):
        self.schedule = os.environ.get("FUSEDRES_CUDA_EMU_SCHEDULE", "plain")
        self.workers = int(os.environ.get("FUSEDRES_CUDA_EMU_THREADS", 0)) or len(
            os.sched_getaffinity(0))
        self.device_count = 2
        self.sm_count = 4
        # Emulated compute capability 1.0: no shipped cubin matches it, so fusedres.cuda takes
        # its compile-from-source path (RawModule(code=...)), as on a GPU newer than every cubin.
        self.compute_capability = "10"


config = _Config()


class CUDADriverError(RuntimeError):
    pass


class CUDARuntimeError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Devices and streams

_local = threading.local()


def _current_id():
    return getattr(_local, "device", 0)


class Device:
    def __init__(self, device=None):
        self.id = _current_id() if device is None else int(device)

    def _check(self):
        if not 0 <= self.id < config.device_count:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    @property
    def compute_capability(self):
        self._check()
        return config.compute_capability

    @property
    def attributes(self):
        self._check()
        return {"MultiProcessorCount": config.sm_count, "MaxThreadsPerBlock": 1024,
                "WarpSize": 32}

    def synchronize(self):
        self._check()

    def __enter__(self):
        self._check()
        stack = _local.__dict__.setdefault("stack", [])
        stack.append(_current_id())
        _local.device = self.id
        return self

    def __exit__(self, *exc):
        _local.device = _local.stack.pop()

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (emulated)>"


class Stream:
    """Launches run synchronously: a stream has nothing to wait for."""

    def __init__(self, null=False, non_blocking=False, ptr=0):
        self.ptr = ptr

    def synchronize(self):
        pass


Stream.null = Stream(null=True)


def get_current_stream():
    return Stream.null


def getDeviceCount():
    return config.device_count


def getDeviceProperties(device):
    Device(device)._check()
    return {"name": b"fusedres CPU emulation of CUDA", "major": int(config.compute_capability[:-1]),
            "minor": int(config.compute_capability[-1]),
            "multiProcessorCount": config.sm_count}


def driverGetVersion():
    return 0


# ---------------------------------------------------------------------------------------------
# Memory

_RED = 256           # bytes of red zone on each side of an allocation
_POISON = 0xFF       # NaN in float16/32/64, -1 in integers
_allocations = weakref.WeakSet()


class _Allocation:
    """Host bytes standing for one device allocation, between two red zones."""

    def __init__(self, nbytes):
        raw = np.empty(nbytes + 3 * _RED, np.uint8)
        start = (-raw.ctypes.data) % _RED + _RED   # 256-byte aligned data, as cudaMalloc's
        self.raw, self.start, self.nbytes = raw, start, nbytes
        raw.fill(_POISON)
        self.data = raw[start:start + nbytes]
        _allocations.add(self)

    def damage(self):
        """Bytes written in the red zones: (before, after)."""
        before = self.raw[:self.start]
        after = self.raw[self.start + self.nbytes:]
        return int(np.count_nonzero(before != _POISON)), int(np.count_nonzero(after != _POISON))


class MemoryPointer:
    def __init__(self, ptr):
        self.ptr = ptr


class ndarray:
    """A device array: a NumPy view of emulated device memory, on a device."""

    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None or order != "C":
            raise NotImplementedError("the CUDA emulation's ndarray takes shape and dtype only")
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in np.atleast_1d(shape)) if np.ndim(shape) else (int(shape),)
        alloc = _Allocation(int(np.prod(shape)) * dtype.itemsize)
        self._init(alloc.data.view(dtype).reshape(shape), alloc, _current_id())

    def _init(self, host, owner, device):
        self._host, self._owner, self._device = host, owner, device

    @classmethod
    def _wrap(cls, host, owner, device):
        a = cls.__new__(cls)
        a._init(host, owner, device)
        return a

    def _view(self, host):
        return ndarray._wrap(host, self._owner, self._device)

    # Attributes
    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    size = property(lambda self: self._host.size)
    ndim = property(lambda self: self._host.ndim)
    nbytes = property(lambda self: self._host.nbytes)
    strides = property(lambda self: self._host.strides)
    flags = property(lambda self: self._host.flags)
    device = property(lambda self: Device(self._device))
    data = property(lambda self: MemoryPointer(self._host.ctypes.data))

    def __len__(self):
        return len(self._host)

    def __repr__(self):
        return f"{self._host!r} (emulated device {self._device})"

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def get(self):
        return self._host.copy()

    # Views and copies
    def __getitem__(self, key):
        return self._view(self._host[_host_operand(key)])

    def __setitem__(self, key, value):  # NumPy values are copied in, as CuPy does
        self._host[_host_operand(key)] = value if isinstance(value, np.ndarray) else \
            _host_operand(value)

    def reshape(self, *shape, order="C"):
        view = self._host.reshape(*shape, order=order)
        if not np.shares_memory(view, self._host):
            raise NotImplementedError("reshape that copies")
        return self._view(view)

    def copy(self):
        out = empty(self.shape, self.dtype)
        out._host[...] = self._host
        return out

    def astype(self, dtype, copy=True):
        out = empty(self.shape, dtype)
        out._host[...] = self._host
        return out

    def fill(self, value):
        self._host.fill(value)

    # Arithmetic, among device arrays and scalars only (like CuPy, never with NumPy arrays)
    def _binary(self, other, op):
        return _wrap_new(op(self._host, _host_operand(other)))

    def _inplace(self, other, op):
        op(self._host, _host_operand(other), out=self._host)
        return self


def _make_ops():
    for name, op in [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                     ("truediv", np.true_divide)]:
        setattr(ndarray, f"__{name}__", lambda self, other, op=op: self._binary(other, op))
        setattr(ndarray, f"__r{name}__",
                lambda self, other, op=op: _wrap_new(op(_host_operand(other), self._host)))
        setattr(ndarray, f"__i{name}__", lambda self, other, op=op: self._inplace(other, op))


_make_ops()


def _host_operand(x):
    """x as NumPy operates on it: a device array's view, or a scalar / index."""
    if isinstance(x, ndarray):
        return x._host
    if isinstance(x, tuple):
        return tuple(_host_operand(k) for k in x)
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    return x


def _wrap_new(host):
    out = empty(host.shape, host.dtype)
    out._host[...] = host
    return out


def empty(shape, dtype=float, order="C"):
    return ndarray(shape, dtype, order=order)


def zeros(shape, dtype=float, order="C"):
    a = empty(shape, dtype, order)
    a.fill(0)
    return a


def ones(shape, dtype=float, order="C"):
    a = empty(shape, dtype, order)
    a.fill(1)
    return a


def empty_like(a, dtype=None):
    return empty(a.shape, a.dtype if dtype is None else dtype)


def zeros_like(a, dtype=None):
    return zeros(a.shape, a.dtype if dtype is None else dtype)


def ones_like(a, dtype=None):
    return ones(a.shape, a.dtype if dtype is None else dtype)


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    host = a._host if isinstance(a, ndarray) else np.asarray(a, dtype)
    out = empty(host.shape, host.dtype if dtype is None else dtype)
    out._host[...] = host
    return out


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def _check_red_zones(kernel):
    for alloc in list(_allocations):
        before, after = alloc.damage()
        if before or after:
            alloc.raw.fill(_POISON)  # report each overrun once
            raise CUDADriverError(
                f"CUDA_ERROR_ILLEGAL_ADDRESS: {kernel} wrote outside a {alloc.nbytes}-byte "
                f"device allocation ({before} bytes in the red zone before it, {after} after)")


# ---------------------------------------------------------------------------------------------
# DLPack (host memory only: the emulated device's memory is the host's)

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                             ("deleter", ctypes.CFUNCTYPE(None, ctypes.c_void_p))]

_DL_CPU, _DL_CUDA_HOST = 1, 3
_DL_KINDS = {0: "i", 1: "u", 2: "f", 6: "b"}
_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.argtypes, _capsule_valid.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
_capsule_get = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get.argtypes, _capsule_get.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_void_p
_capsule_rename = ctypes.pythonapi.PyCapsule_SetName
_capsule_rename.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_rename.restype = ctypes.c_int


class _DLOwner:
    """Keeps a consumed DLManagedTensor alive and calls its deleter when the views are gone."""

    def __init__(self, managed):
        self.managed = managed

    def __del__(self):
        if self.managed.deleter:
            self.managed.deleter(ctypes.addressof(self.managed))


def from_dlpack(obj):
    """A device array viewing host memory described by a DLPack capsule (or obj.__dlpack__())."""
    capsule = obj.__dlpack__() if hasattr(obj, "__dlpack__") else obj
    if not _capsule_valid(capsule, b"dltensor"):
        raise ValueError("from_dlpack needs an unconsumed DLPack capsule ('dltensor')")
    managed = _DLManagedTensor.from_address(_capsule_get(capsule, b"dltensor"))
    t = managed.dl_tensor
    if t.device.device_type not in (_DL_CPU, _DL_CUDA_HOST):
        raise ValueError(f"the CUDA emulation views host memory only, not DLPack device type "
                         f"{t.device.device_type}")
    if t.dtype.lanes != 1 or t.dtype.code not in _DL_KINDS:
        raise ValueError(f"unsupported DLPack dtype (code {t.dtype.code}, lanes {t.dtype.lanes})")
    dtype = np.dtype(f"{_DL_KINDS[t.dtype.code]}{t.dtype.bits // 8}")
    shape = tuple(t.shape[i] for i in range(t.ndim))
    if t.strides:
        strides = tuple(t.strides[i] * dtype.itemsize for i in range(t.ndim))
    else:
        strides = tuple(int(s) for s in np.empty(shape, dtype).strides) if shape else ()
    span = dtype.itemsize + sum((n - 1) * abs(s) for n, s in zip(shape, strides))
    _capsule_rename(capsule, b"used_dltensor")  # ours now: the producer will not free it
    owner = _DLOwner(managed)
    if 0 in shape:
        host = np.empty(shape, dtype)
    else:
        buf = (ctypes.c_char * span).from_address(t.data + t.byte_offset)
        host = np.lib.stride_tricks.as_strided(np.frombuffer(buf, dtype), shape, strides)
    return ndarray._wrap(host, owner, _current_id())


# ---------------------------------------------------------------------------------------------
# Modules and kernels

_SCALARS = {np.dtype(c).type for c in "?bhilqBHILQefdFD"}


def _argument(a):
    """(bytes, what) of one kernel argument, converted as CuPy's launcher converts it."""
    if a is None:
        return bytes(8), "a null pointer"
    if isinstance(a, ndarray):
        return a._host.ctypes.data.to_bytes(8, "little"), f"a {a.dtype} device array"
    if type(a) not in _SCALARS:
        if isinstance(a, bool):
            a = np.bool_(a)
        elif isinstance(a, int):
            a = np.int64(a)
        elif isinstance(a, float):
            a = np.float64(a)
        else:
            raise TypeError(f"Unsupported type {type(a)}")
    return a.tobytes(), np.dtype(type(a)).name


class Function:
    """One kernel of a RawModule: ``kernel(grid, block, args, shared_mem=0, stream=None)``."""

    def __init__(self, module, info):
        self.module, self.info = module, info

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if shared_mem:
            raise NotImplementedError("dynamic shared memory is not emulated")
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        args = tuple(args)
        name, sizes = self.info.name, self.info.sizes
        if len(args) != len(sizes):
            raise TypeError(f"{name} takes {len(sizes)} arguments, got {len(args)}")
        bufs = []
        for i, (a, size) in enumerate(zip(args, sizes)):
            data, what = _argument(a)
            if len(data) != size:
                raise TypeError(f"{name}: argument {i} is {what} of {len(data)} bytes but the "
                                f"kernel's parameter {i} has {size} bytes")
            buf = (ctypes.c_uint64 * max(1, -(-size // 8)))()
            ctypes.memmove(buf, data, size)
            bufs.append(buf)
        ptrs = (ctypes.c_void_p * max(1, len(bufs)))(*[ctypes.addressof(b) for b in bufs])
        status, message = self.module._lib.launch(
            self.info, grid, block, ptrs, config.schedule == "reverse", config.workers)
        if status == 1:
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {name}: {message}")
        if status:
            raise CUDADriverError(f"CUDA_ERROR_LAUNCH_FAILED: {name}: {message}")
        _check_red_zones(name)


def _dims(d, what):
    if not isinstance(d, tuple) or not 1 <= len(d) <= 3:
        raise TypeError(f"{what} must be a tuple of 1 to 3 ints, got {d!r}")
    d = tuple(int(v) for v in d) + (1,) * (3 - len(d))
    if any(not 0 <= v < 2**32 for v in d):
        raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {what} {d}")
    return d


_libraries = {}
_libraries_lock = threading.Lock()


class RawModule:
    """CUDA source compiled for the CPU emulation; cubins (path=...) cannot run here."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc", **kwargs):
        if path is not None or code is None:
            raise NotImplementedError("the CUDA emulation runs CUDA source (code=...), not cubins")
        if backend != "nvrtc" or any(v for v in kwargs.values()):
            raise NotImplementedError(f"RawModule options {backend!r}, {kwargs}")
        self.code, self.options = code, tuple(options)
        self._lib = None
        self._functions = {}

    def _library(self):
        if self._lib is None:
            key = (self.code, self.options)
            with _libraries_lock:
                if key not in _libraries:
                    _libraries[key] = build.Library(build.build(self.code, self.options))
                self._lib = _libraries[key]
        return self._lib

    def get_function(self, name):
        fn = self._functions.get(name)
        if fn is None:
            info = self._library().kernel(name)
            if info is None:
                raise CUDADriverError("CUDA_ERROR_NOT_FOUND: named symbol not found")
            fn = self._functions[name] = Function(self, info)
        return fn


# ---------------------------------------------------------------------------------------------
# The module tree as CuPy lays it out: cupy.cuda, cupy.cuda.runtime, cupy.cuda.driver

def _namespace(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


runtime = _namespace("cupy.cuda.runtime", getDeviceCount=getDeviceCount,
                     getDeviceProperties=getDeviceProperties, driverGetVersion=driverGetVersion,
                     CUDARuntimeError=CUDARuntimeError)
driver = _namespace("cupy.cuda.driver", CUDADriverError=CUDADriverError)
compiler = _namespace("cupy.cuda.compiler", CompileException=build.CompileException)
cuda = _namespace("cupy.cuda", Device=Device, Stream=Stream, get_current_stream=get_current_stream,
                  runtime=runtime, driver=driver, compiler=compiler, MemoryPointer=MemoryPointer,
                  is_available=lambda: config.device_count > 0)
MODULES = {"cupy": None, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime,
           "cupy.cuda.driver": driver, "cupy.cuda.compiler": compiler}


@contextlib.contextmanager
def installed():
    """``import cupy`` (and its submodules) gives this stand-in inside the block."""
    import sys
    me = sys.modules[__name__]
    saved = {name: sys.modules.get(name) for name in MODULES}
    try:
        for name, mod in MODULES.items():
            sys.modules[name] = mod if mod is not None else me
        yield me
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
