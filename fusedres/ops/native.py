"""The fused ops as MXNet operators, registered next to MXNet's own.

``libfusedres_mxop.so`` (csrc/mxop, built with fusedres) adds ``_fusedres_conv1d_bn_relu`` and
``_fusedres_add_relu`` (and their backward ops) to libmxnet's operator registry, the way
MXNet's built-in operators are registered: a built-in op's per-call cost, ``OpReqType`` for
every output (``grad_req`` write, add, null; MXNet's in-place gradient aggregation), the
executor's ``is_train`` in every mode (autograd, ``hybridize`` with or without
``static_alloc``, ``Symbol.bind``, Module), and MXNet's own conversion of MKLDNN-layout inputs.
They run on the CPU; on a GPU the blocks use the CustomOps (see :mod:`fusedres.ops`).

``import fusedres`` loads them, so a process that imports a model exported with them needs
only ``import fusedres`` before ``SymbolBlock.imports``.

The library is built against the headers of MXNet 1.9.1's PyPI wheels and for the C++ ABI of
their ``libmxnet.so`` (GCC 4.8's, old std::string ABI: csrc/mxop/nnvm_bridge.h says how). Before
loading it this module checks that the running libmxnet has that ABI, and refuses with a reason
instead of loading it into a libmxnet built otherwise.
"""
import ctypes
import os
import re
import struct
import threading
from pathlib import Path

import mxnet as mx

LIBRARY_NAME = "libfusedres_mxop.so"
CONV1D_BN_RELU = "_fusedres_conv1d_bn_relu"
ADD_RELU = "_fusedres_add_relu"
POOL1D = "_fusedres_pool1d"
LAYOUT_COPY = "_fusedres_layout_copy"  # the CustomOps' guard on the CPU (fusedres/ops/custom.py)

# C++ symbols the library takes from libmxnet, in the old-ABI mangling it was built for.
_REQUIRED_SYMBOLS = (
    "_ZN4dmlc8RegistryIN4nnvm2OpEE3GetEv",                       # dmlc::Registry<Op>::Get()
    "_ZN4nnvm2Op13UpdateAttrMapERKSsSt8functionIFvPN4dmlc3anyEEE",  # Op::UpdateAttrMap
    "_ZN4nnvm2OpC1Ev",                                           # Op::Op()
    "_ZN5mxnet6Engine3GetEv",                                    # Engine::Get()
    "_ZNK5mxnet2op20ElemwiseGradUseInOutclERKSt10shared_ptrIN4nnvm4NodeEERKSt6vectorINS3_"
    "9NodeEntryESaIS9_EE",                                       # ElemwiseGradUseInOut()
    "_ZN5mxnet2op19MakeNonlossGradNodeEPKcRKSt10shared_ptrIN4nnvm4NodeEERKSt6vectorINS4_9Node"
    "EntryESaISA_EESE_RKSt13unordered_mapISsSsSt4hashISsESt8equal_toISsESaISt4pairIKSsSsEEE",
)

_lock = threading.Lock()
_state = {"loaded": None, "error": None}


def library_path():
    """Where the library is: $FUSEDRES_MXOP_LIB, else next to fusedres/_C."""
    env = os.environ.get("FUSEDRES_MXOP_LIB")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parent.parent / LIBRARY_NAME)


def _elf_comment(path):
    """The .comment section of an ELF file (the compilers that built it), or b""."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit ELF only
            return b""
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        strtab = sections[shstrndx]
        f.seek(strtab[4])
        names = f.read(strtab[5])
        for name_off, _, _, _, off, size in sections:
            if names[name_off:names.index(b"\0", name_off)] == b".comment":
                f.seek(off)
                return f.read(size)
    return b""


def libmxnet_abi():
    """(path, legacy_invoker) of the running libmxnet, or raises RuntimeError saying why the
    library cannot be loaded into it. legacy_invoker: built by GCC < 5 (see nnvm_bridge.h)."""
    lib = mx.base._LIB
    path = getattr(lib, "_name", None)
    if not path or not os.path.exists(path):
        raise RuntimeError("cannot locate the loaded libmxnet.so")
    missing = [s for s in _REQUIRED_SYMBOLS if not hasattr(lib, s)]
    if missing:
        raise RuntimeError(
            f"{path} does not export {missing[0]}: it is not built like MXNet 1.9.1's PyPI "
            "wheels (old C++ string ABI), which the fused MXNet operators need")
    versions = [int(v) for v in re.findall(rb"GCC: \([^)]*\) (\d+)\.", _elf_comment(path))]
    if not versions:
        raise RuntimeError(f"{path} does not say which compiler built it (no .comment section)")
    return path, max(versions) < 5


def load():
    """Register the ops once per process; returns the library's path or raises RuntimeError."""
    with _lock:
        if _state["loaded"]:
            return _state["loaded"]
        if _state["error"] is not None:
            raise RuntimeError(_state["error"])
        try:
            _state["loaded"] = _load()
        except RuntimeError as err:
            _state["error"] = str(err)
            raise
        return _state["loaded"]


def _load():
    if not mx.__version__.startswith("1.9."):
        raise RuntimeError(f"the fused MXNet operators are built for MXNet 1.9, not "
                           f"{mx.__version__}")
    path = library_path()
    if not os.path.exists(path):
        raise RuntimeError(f"{path} does not exist (it is built with fusedres: reinstall, or "
                           "set FUSEDRES_MXOP_LIB)")
    _, legacy = libmxnet_abi()
    try:
        lib = ctypes.CDLL(path)
    except OSError as err:
        raise RuntimeError(f"cannot load {path}: {err}") from None
    register = lib.fusedres_mxop_register
    register.restype = ctypes.c_char_p
    register.argtypes = [ctypes.c_int]
    error = register(int(legacy))
    if error is not None:
        raise RuntimeError(f"{path} failed to register its operators: {error.decode()}")
    _make_frontends()
    return path


def _make_frontends():
    """mx.nd._internal / mx.sym._internal functions for the new ops, made by MXNet's own
    frontend generators (MXNet made its own ops' functions at import, before these existed)."""
    from mxnet.ndarray.register import _make_ndarray_function
    from mxnet.symbol.register import _make_symbol_function
    for name in (CONV1D_BN_RELU, ADD_RELU, POOL1D, LAYOUT_COPY):
        handle = mx.base.OpHandle()
        mx.base.check_call(mx.base._LIB.NNGetOpHandle(mx.base.c_str(name), ctypes.byref(handle)))
        setattr(mx.nd._internal, name, _make_ndarray_function(handle, name, name))
        setattr(mx.sym._internal, name, _make_symbol_function(handle, name, name))


def available():
    """(True, path) when the ops are registered (loading them if needed), else (False, why)."""
    try:
        return True, load()
    except RuntimeError as err:
        return False, str(err)




def conv1d_bn_relu(F, attrs, data, weight, bias, gamma, beta, running_mean, running_var,
                   name=None):
    """relu(BatchNorm(Convolution(data))) by the MXNet operator; attrs: a ConvAttrs."""
    load()
    # By name: MXNet's generated frontends map positional arrays to the op's full argument
    # list, which has a bias slot also when no_bias leaves it out.
    kw = dict(attrs.op_kwargs, data=data, weight=weight, gamma=gamma, beta=beta,
              running_mean=running_mean, running_var=running_var)
    if bias is not None:
        kw["bias"] = bias
    if name is not None:
        kw["name"] = name
    return getattr(F._internal, CONV1D_BN_RELU)(**kw)


def add_relu(F, lhs, rhs, name=None):
    """relu(lhs + rhs) by the MXNet operator."""
    load()
    kw = {} if name is None else {"name": name}
    return getattr(F._internal, ADD_RELU)(lhs, rhs, **kw)


def pool1d(F, data, kernel, stride, pad, pool_type, pooling_convention, count_include_pad,
           name=None):
    """1-D max or average pooling of NCW data by the MXNet operator (MXNet's Pooling rules)."""
    load()
    kw = {} if name is None else {"name": name}
    return getattr(F._internal, POOL1D)(data, kernel=kernel, stride=stride, pad=pad,
                                        pool_type=pool_type,
                                        pooling_convention=pooling_convention,
                                        count_include_pad=count_include_pad, **kw)


__all__ = ["available", "load", "library_path", "libmxnet_abi", "conv1d_bn_relu", "add_relu",
           "pool1d", "CONV1D_BN_RELU", "ADD_RELU", "POOL1D", "LAYOUT_COPY"]
