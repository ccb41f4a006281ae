"""PyTorch eager peers for the CPU benchmarks, given the very same input values, run in a worker
process of their own (optional: torch is not a dependency; `pip install torch==2.13.0`
installs a local CPU build here).

Why another process: once PyTorch has run its OpenMP-parallel operators in a process, MXNet's
own OpenMP-parallel operators in that process slow down by up to 100x (a training step of stock
Conv2D+BatchNorm at (1, 16, 256) k3: 0.22 ms alone, 20-25 ms with PyTorch timed beside it,
OMP_NUM_THREADS=2; torch.set_num_threads alone doubles it), and the fused kernels by 2-4x. In
their own process the peers are still timed interleaved with the MXNet contenders, call by
call: each PyTorch contender here is a proxy that asks the worker to run one call and returns
the seconds the worker measured around it (benchmarks.timed_call takes a contender's returned
float as its time, so the pipe's round trip is not counted). Across processes, threads that
keep spinning after a call still slow whoever runs next on the same cores: the timed call of
every contender follows an untimed one of its own (benchmarks.interleaved_times).

Every peer runs on all the processors (torch.set_num_threads(os.cpu_count())), as the fused
kernels do. Inference is timed as written (Conv1d -> BatchNorm1d -> ReLU, eval, no_grad) and
with every BatchNorm folded into its conv (torch.nn.utils.fusion.fuse_conv_bn_eval), the
fastest eager inference PyTorch offers.

    python bench/peers.py --worker      # (what Worker starts: requests on stdin, replies on stdout)
"""
import atexit
import copy
import dataclasses
import os
import pickle
import struct
import subprocess
import sys
import time


def _send(stream, obj):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _recv(stream):
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("the PyTorch worker process exited")
    return pickle.loads(stream.read(struct.unpack("<Q", head)[0]))


class Worker:
    """The PyTorch process: setup() builds contenders there, call() runs one."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        hello = _recv(self.proc.stdout)
        self.version, self.threads = hello["torch"], hello["threads"]

    def request(self, *msg):
        _send(self.proc.stdin, msg)
        reply = _recv(self.proc.stdout)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def setup(self, kind, spec, mode, x_np, dy_np):
        """{name: proxy} of the PyTorch contenders of kind ('conv', 'model', 'add_relu')."""
        names = self.request("setup", kind, spec, mode, x_np, dy_np)
        return {name: (lambda name=name: self.request("call", name)) for name in names}

    def close(self):
        if self.proc.poll() is None:
            try:
                _send(self.proc.stdin, ("exit",))
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


_WORKER = []


def worker():
    if not _WORKER:
        _WORKER.append(Worker())
        atexit.register(_WORKER[0].close)
    return _WORKER[0]


def available():
    return worker().version is not None


def version():
    """PyTorch's version and threads in the worker, or None when it is not installed."""
    w = worker()
    return (w.version, w.threads) if w.version else None


def _contenders(kind, spec, mode, x_np, dy_np):
    w = worker()
    return w.setup(kind, spec, mode, x_np, dy_np) if w.version else {}


def conv_contenders(shape, mode, x_np, dy_np):
    """PyTorch eager Conv1d+BatchNorm1d+ReLU layers of shape (benchmarks.BenchShape) on x_np;
    training: forward + backward, the input needing a gradient too."""
    layers = [dataclasses.asdict(layer) for layer in shape.layers]
    return _contenders("conv", layers, mode, x_np, dy_np)


def model_contenders(m, mode, x_np, dy_np):
    """benchmarks.ModelShape m's model in PyTorch (benchmarks.stock_resnet1d's twin) on x_np:
    training step forward + backward (the input needs no gradient), inference as written and
    folded."""
    return _contenders("model", dataclasses.asdict(m), mode, x_np, dy_np)


def add_relu_contenders(a_np, b_np, backward):
    return _contenders("add_relu", None, "train" if backward else "infer", a_np, b_np)


# The worker's side ---------------------------------------------------------------------------

def _layers(torch, layers):
    mods = []
    for a in layers:
        mods += [torch.nn.Conv1d(a["cin"], a["cout"], a["kernel"], stride=a["stride"],
                                 padding=a["pad"], dilation=a["dilation"], groups=a["groups"]),
                 torch.nn.BatchNorm1d(a["cout"]), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods)


def _resnet1d(torch, m):
    class BasicBlock(torch.nn.Module):
        def __init__(self, cin, c, stride):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Conv1d(cin, c, 3, stride, 1, bias=False), torch.nn.BatchNorm1d(c),
                torch.nn.ReLU(), torch.nn.Conv1d(c, c, 3, 1, 1, bias=False),
                torch.nn.BatchNorm1d(c))
            self.downsample = None
            if stride > 1 or cin != c:
                self.downsample = torch.nn.Sequential(
                    torch.nn.Conv1d(cin, c, 1, stride, bias=False), torch.nn.BatchNorm1d(c))

        def forward(self, x):
            skip = self.downsample(x) if self.downsample is not None else x
            return torch.relu(self.body(x) + skip)

    k, chans = m["stem_kernel"], m["channels"]
    mods = [torch.nn.Conv1d(m["c_in"], chans[0], k, 2, k // 2, bias=False),
            torch.nn.BatchNorm1d(chans[0]), torch.nn.ReLU(), torch.nn.MaxPool1d(3, 2, 1)]
    cin = chans[0]
    for i, c in enumerate(chans):
        for j in range(2):
            mods.append(BasicBlock(cin, c, 2 if i > 0 and j == 0 else 1))
            cin = c
    mods += [torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), torch.nn.Linear(cin, m["classes"])]
    return torch.nn.Sequential(*mods)


def _fold(torch, module):
    """module (eval) with every Conv1d -> BatchNorm1d pair in a Sequential folded into one
    Conv1d (the BatchNorm becomes an Identity), in place."""
    for child in module.children():
        _fold(torch, child)
    if isinstance(module, torch.nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, torch.nn.Conv1d) and isinstance(bn, torch.nn.BatchNorm1d):
                module._modules[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                module._modules[b] = torch.nn.Identity()
    return module


def _build(torch, kind, spec, mode, x_np, dy_np):
    if kind == "add_relu":
        a, b = torch.from_numpy(x_np), torch.from_numpy(dy_np)
        if mode == "infer":
            def fwd():
                with torch.no_grad():
                    torch.relu(a + b)
            return {"torch": fwd}
        a.requires_grad_(True)
        b.requires_grad_(True)
        return {"torch": lambda: torch.relu(a + b).sum().backward()}
    make = (lambda: _layers(torch, spec)) if kind == "conv" else (lambda: _resnet1d(torch, spec))
    x = torch.from_numpy(x_np)
    if mode == "train":
        net = make().train()
        dy = torch.from_numpy(dy_np)
        if kind == "conv":  # a layer inside a network: its input needs a gradient too
            x.requires_grad_(True)
        return {"torch": lambda: net(x).backward(dy)}
    net = make().eval()
    folded = _fold(torch, copy.deepcopy(net))  # the same weights and statistics, folded

    def infer(model):
        def run():
            with torch.no_grad():
                model(x)
        return run
    return {"torch": infer(net), "torch folded": infer(folded)}


def _serve():
    """The worker: requests from stdin, replies on stdout (anything printed goes to stderr)."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr
    try:
        import torch
        torch.set_num_threads(os.cpu_count() or 2)
    except ImportError:
        torch = None
    _send(out, {"torch": torch.__version__ if torch else None,
                "threads": torch.get_num_threads() if torch else 0})
    contenders = {}
    while True:
        try:
            msg = _recv(inp)
        except EOFError:
            return
        try:
            if msg[0] == "exit":
                return
            if msg[0] == "setup":
                contenders = None
                contenders = _build(torch, *msg[1:])
                _send(out, list(contenders))
            elif msg[0] == "call":
                fn = contenders[msg[1]]
                t0 = time.perf_counter()
                fn()
                _send(out, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - sent back to be raised there
            _send(out, RuntimeError(f"PyTorch worker: {type(e).__name__}: {e}"))


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _serve()
