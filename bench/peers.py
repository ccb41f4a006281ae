"""PyTorch eager peers for the CPU benchmarks, given the very same inputs (optional: torch is
not a dependency; `pip install torch==2.13.0` installs a local CPU build here)."""
try:
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    torch = None


def available():
    return torch is not None


def _conv_bn_relu(shape):
    conv = torch.nn.Conv1d(shape.c, shape.c, shape.kernel, stride=shape.stride, padding=shape.pad,
                           dilation=shape.dilation)
    return torch.nn.Sequential(conv, torch.nn.BatchNorm1d(shape.c), torch.nn.ReLU())


def conv_contenders(shape, mode, x_np, dy_np):
    """PyTorch eager Conv1d+BatchNorm1d+ReLU on x_np; inference also BN folded into the conv."""
    if torch is None:
        return {}
    torch.set_num_threads(2)
    net = _conv_bn_relu(shape)
    x, dy = torch.from_numpy(x_np), torch.from_numpy(dy_np)
    if mode == "train":
        net.train()
        x.requires_grad_(True)

        def step():
            y = net(x)
            y.backward(dy)
        return {"torch": step}
    net.eval()
    folded = torch.nn.Sequential(
        torch.nn.utils.fusion.fuse_conv_bn_eval(net[0], net[1]), torch.nn.ReLU()).eval()

    def infer(model):
        def run():
            with torch.no_grad():
                model(x)
        return run
    return {"torch": infer(net), "torch folded": infer(folded)}


def add_relu_contenders(a_np, b_np, backward):
    if torch is None:
        return {}
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
