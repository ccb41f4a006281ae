"""PyTorch eager peers for the CPU benchmarks, given the very same inputs (optional: torch is
not a dependency; `pip install torch==2.13.0` installs a local CPU build here).

Every peer runs on all the processors (torch.set_num_threads(os.cpu_count())), as the fused
kernels do. Inference is timed as written (Conv1d -> BatchNorm1d -> ReLU, eval, no_grad) and
with every BatchNorm folded into its conv (torch.nn.utils.fusion.fuse_conv_bn_eval), the
fastest eager inference PyTorch offers.
"""
import copy
import os

try:
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    torch = None


def available():
    return torch is not None


def _threads():
    torch.set_num_threads(os.cpu_count() or 2)


def _layers(shape):
    mods = []
    for layer in shape.layers:
        mods += [torch.nn.Conv1d(layer.cin, layer.cout, layer.kernel, stride=layer.stride,
                                 padding=layer.pad, dilation=layer.dilation, groups=layer.groups),
                 torch.nn.BatchNorm1d(layer.cout), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods)


def _fold(module):
    """module (eval) with every Conv1d -> BatchNorm1d pair in a Sequential folded into one
    Conv1d (the BatchNorm becomes an Identity), in place."""
    for child in module.children():
        _fold(child)
    if isinstance(module, torch.nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, torch.nn.Conv1d) and isinstance(bn, torch.nn.BatchNorm1d):
                module._modules[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                module._modules[b] = torch.nn.Identity()
    return module


def _contenders(make, mode, x_np, dy_np, input_grad):
    _threads()
    x = torch.from_numpy(x_np)
    if mode == "train":
        net = make().train()
        dy = torch.from_numpy(dy_np)
        if input_grad:
            x.requires_grad_(True)

        def step():
            net(x).backward(dy)
        return {"torch": step}
    net = make().eval()
    folded = _fold(copy.deepcopy(net))  # the same weights and statistics, folded

    def infer(model):
        def run():
            with torch.no_grad():
                model(x)
        return run
    return {"torch": infer(net), "torch folded": infer(folded)}


def conv_contenders(shape, mode, x_np, dy_np):
    """PyTorch eager Conv1d+BatchNorm1d+ReLU layers of shape (benchmarks.BenchShape) on x_np;
    training: forward + backward, the input needing a gradient too."""
    if torch is None:
        return {}
    return _contenders(lambda: _layers(shape), mode, x_np, dy_np, input_grad=True)


class _BasicBlock(torch.nn.Module if torch else object):
    def __init__(self, cin, c, stride):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv1d(cin, c, 3, stride, 1, bias=False), torch.nn.BatchNorm1d(c),
            torch.nn.ReLU(), torch.nn.Conv1d(c, c, 3, 1, 1, bias=False), torch.nn.BatchNorm1d(c))
        self.downsample = None
        if stride > 1 or cin != c:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv1d(cin, c, 1, stride, bias=False), torch.nn.BatchNorm1d(c))

    def forward(self, x):
        skip = self.downsample(x) if self.downsample is not None else x
        return torch.relu(self.body(x) + skip)


def resnet1d(m):
    """benchmarks.ModelShape m's model in PyTorch (benchmarks.stock_resnet1d's twin)."""
    k = m.stem_kernel
    mods = [torch.nn.Conv1d(m.c_in, m.channels[0], k, 2, k // 2, bias=False),
            torch.nn.BatchNorm1d(m.channels[0]), torch.nn.ReLU(), torch.nn.MaxPool1d(3, 2, 1)]
    cin = m.channels[0]
    for i, c in enumerate(m.channels):
        for j in range(2):
            mods.append(_BasicBlock(cin, c, 2 if i > 0 and j == 0 else 1))
            cin = c
    mods += [torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(), torch.nn.Linear(cin, m.classes)]
    return torch.nn.Sequential(*mods)


def model_contenders(m, mode, x_np, dy_np):
    """The PyTorch model on x_np: training step forward + backward (the input needs no
    gradient), inference as written and folded."""
    if torch is None:
        return {}
    return _contenders(lambda: resnet1d(m), mode, x_np, dy_np, input_grad=False)


def add_relu_contenders(a_np, b_np, backward):
    if torch is None:
        return {}
    _threads()
    a, b = torch.from_numpy(a_np), torch.from_numpy(b_np)
    if not backward:
        def fwd():
            with torch.no_grad():
                torch.relu(a + b)
        return {"torch": fwd}
    a.requires_grad_(True)
    b.requires_grad_(True)

    def step():
        torch.relu(a + b).sum().backward()
    return {"torch": step}
