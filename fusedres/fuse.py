"""``fuse(net)``: make an existing Gluon model use the fused ops, keeping its parameters.

Each ``Conv1D -> BatchNorm -> relu`` run becomes one ``ConvBNReLU1D``, and each
``Conv1D -> BatchNorm`` not followed by a relu (a residual body's last conv, a projection
shortcut) one ``ConvBN1D``, holding the very ``Parameter`` objects of the blocks it replaces
(values, running statistics, names, grad_req, lr/wd multipliers, sharing, dtype, context).
Both also take the stock pair off MXNet 1.9.1's crashing MKLDNN BatchNorm backward. Runs are
found in ``Sequential``/``HybridSequential`` containers by position, and among the children of
custom Blocks by tracing one forward pass (``sample=``), since their ``forward`` code is not
visible. What was fused and what was left, and why, comes back as a ``FuseReport``.
"""
import inspect
import json
import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import mxnet as mx
import numpy as np
from mxnet.gluon import Block, HybridBlock, nn

from . import ops
from .nn import ConvBN1D, ConvBNReLU1D
from .nn.basic import params_context
from .nn.pooling import pool1d_from

_PARAM_MAP_ATTR = "_fusedres_param_map"


@dataclass
class FuseReport:
    fused: list = field(default_factory=list)  # (path, description)
    root: object = field(default=None, repr=False, compare=False)
    left: list = field(default_factory=list)   # (path, reason)
    pooling: list = field(default_factory=list)  # (path, description): stock 1-D pooling swapped
    joins: list = field(default_factory=list)  # (path, description): relu(a + b) in forward code

    def __str__(self):
        lines = [f"fused {len(self.fused)} Conv1D->BatchNorm(->relu) run(s)"]
        lines += [f"  {path}: {what}" for path, what in self.fused]
        if self.pooling:
            lines.append(f"replaced {len(self.pooling)} 1-D pooling block(s)")
            lines += [f"  {path}: {what}" for path, what in self.pooling]
        if self.joins:
            lines.append(f"fused {len(self.joins)} residual join(s) relu(a + b) in forward code")
            lines += [f"  {path}: {what}" for path, what in self.joins]
        if self.left:
            lines.append(f"left {len(self.left)} unchanged")
            lines += [f"  {path}: {why}" for path, why in self.left]
        return "\n".join(lines)


class _Identity(HybridBlock):
    """Stands where a fused BatchNorm or activation was called from custom forward code."""

    def hybrid_forward(self, F, x):
        return x

    def __repr__(self):
        return "Identity(fused into the preceding ConvBNReLU1D)"


def _is_relu(block):
    if isinstance(block, nn.Activation):
        return block._act_type == "relu"
    if isinstance(block, nn.LeakyReLU):
        return block._alpha == 0
    return False


def _why_not(conv, bn):
    """None when conv -> bn can be fused (with or without a following relu), else why not."""
    if not isinstance(conv, nn.Conv1D):
        return "not a Conv1D"
    if conv._kwargs["layout"] != "NCW":
        return f"Conv1D layout {conv._kwargs['layout']} (only NCW is fused)"
    if conv.act is not None:
        return "Conv1D has its own activation, applied before the BatchNorm"
    if not isinstance(bn, nn.BatchNorm):
        return "Conv1D is not followed by a BatchNorm"
    if bn._kwargs["axis"] != 1:
        return f"BatchNorm axis={bn._kwargs['axis']} (the channel axis of NCW is 1)"
    if bn._kwargs["fix_gamma"]:
        return "BatchNorm(scale=False) fixes gamma to 1; not supported by the fused op"
    return None


def _fused_from(conv, bn, relu):
    """ConvBNReLU1D (relu) or ConvBN1D holding conv's and bn's own Parameter objects."""
    k = conv._kwargs
    own = {"weight": conv.weight, "gamma": bn.gamma, "beta": bn.beta,
           "running_mean": bn.running_mean, "running_var": bn.running_var}
    if conv.bias is not None:
        own["bias"] = conv.bias
    fused = (ConvBNReLU1D if relu else ConvBN1D)(
        conv._channels, k["kernel"], strides=k["stride"], padding=k["pad"],
        dilation=k["dilate"], groups=k["num_group"], use_bias=not k["no_bias"],
        momentum=bn._kwargs["momentum"], epsilon=bn._kwargs["eps"],
        use_global_stats=bn._kwargs["use_global_stats"], in_channels=conv._in_channels,
        prefix=conv.prefix)
    # The block's own (never initialized) Parameters give way to the originals, registered
    # under their own names, as a hybridized graph looks them up by name.
    for name, param in own.items():
        fused._reg_params[name] = param  # what hybrid_forward receives
        object.__setattr__(fused, name, param)  # Block.__setattr__ refuses to replace one
    fused._params._params = OrderedDict((p.name, p) for p in own.values())
    if conv._active:
        fused.hybridize(True, **dict(conv._flags))
    return fused


def _describe(conv, bn, act):
    k = conv._kwargs
    relu = act is not None or bn.fuse_relu
    chain = f"{conv.name} -> {bn.name}" + (f" -> {act.name if act else 'relu'}" if relu else "")
    return (f"{chain} ({conv._channels} channels, kernel {k['kernel'][0]}) as "
            f"{'ConvBNReLU1D' if relu else 'ConvBN1D'}")


def _pooling(child, path, report):
    """fusedres's pooling block in place of a stock nn.MaxPool1D/AvgPool1D (NCW, not global):
    the same function, without MXNet's slow oneDNN pooling of plain arrays (fusedres.nn.pooling).
    None for any other block."""
    new = pool1d_from(child)
    if new is not None:
        report.pooling.append((path, f"{child.name} ({type(child).__name__}) as "
                                     f"fusedres.nn.{type(new).__name__}"))
    return new


def _fuse_sequential(seq, path, report, trace):
    items = list(seq._children.items())
    out, i = [], 0
    while i < len(items):
        _, child = items[i]
        pool = _pooling(child, f"{path}{i}", report)
        if pool is not None:
            out.append(pool)
            i += 1
            continue
        nxt = [c for _, c in items[i + 1:i + 3]]
        bn = nxt[0] if nxt else None
        act = nxt[1] if len(nxt) > 1 and _is_relu(nxt[1]) else None
        if isinstance(child, nn.Conv1D):
            why = _why_not(child, bn)
            if why is None:
                relu = act is not None or bn.fuse_relu
                report.fused.append((f"{path}{i}", _describe(child, bn, act)))
                out.append(_fused_from(child, bn, relu))
                i += 3 if act is not None else 2
                continue
            report.left.append((f"{path}{i}", why))
        _fuse_tree(child, f"{path}{i}.", report, trace)
        out.append(child)
        i += 1
    # Renumber like Sequential.add does, so that net[i] and later add() stay consistent.
    seq._children = OrderedDict((str(j), c) for j, c in enumerate(out))


@contextmanager
def _imperatively(net):
    """Run net's HybridBlocks imperatively: hooks on children fire only then, and cached
    graphs built before a replacement would still run the replaced blocks."""
    hybrid = [(b, b._active) for b in _walk(net) if isinstance(b, HybridBlock)]
    for b, _ in hybrid:
        b._active = False
    try:
        yield
    finally:
        for b, active in hybrid:
            b._active = active


def _outputs(out):
    return [o.asnumpy() for o in (out if isinstance(out, (list, tuple)) else [out])]


class _Trace:
    """One inference-mode forward of the sample: which leaf block was called on what, and the
    output that every replacement in a custom Block must reproduce."""

    def __init__(self, net, sample):
        self.net, self.sample, self.calls = net, sample, {}

        def hook(block, inputs, output):
            self.calls.setdefault(id(block), []).append((list(inputs), output))

        def leaves(block):
            if not block._children:
                yield block
            for c in block._children.values():
                yield from leaves(c)

        handles = [leaf.register_forward_hook(hook) for leaf in leaves(net)]
        try:
            self.want = self._run()
        finally:
            for h in handles:
                h.detach()

    def _run(self):
        with _imperatively(self.net), mx.autograd.predict_mode():
            return _outputs(self.net(self.sample))

    def unchanged(self):
        got = self._run()
        return all(g.shape == w.shape and
                   np.max(np.abs(g - w), initial=0) <= 1e-4 * max(1.0, np.max(np.abs(w), initial=0))
                   for g, w in zip(got, self.want))


def _walk(block):
    yield block
    for c in block._children.values():
        yield from _walk(c)


def _fuse_custom(block, path, report, trace):
    """Among a custom Block's children: a conv whose only consumer is a BatchNorm (and that
    BatchNorm's only consumer a relu block), each called once, becomes the fused block; the
    others become identities, so the unchanged forward code computes the fused result. What
    the hooks cannot see (an output also used by plain operators) is caught by running the
    sample again: a replacement that changes the output is undone."""
    children = list(block._children.items())
    if trace is None:
        for name, child in children:
            if isinstance(child, nn.Conv1D):
                report.left.append((f"{path}{name}", "inside a custom Block: pass sample= to "
                                    "fuse() so that its forward can be traced"))
        return
    calls, consumers = trace.calls, {}
    for bid, lst in calls.items():
        for inputs, _ in lst:
            for x in inputs:
                consumers.setdefault(id(x), []).append(bid)

    def only_consumer(blk):
        lst = calls.get(id(blk), [])
        if len(lst) != 1:
            return None
        users = consumers.get(id(lst[0][1]), [])
        return users[0] if len(users) == 1 else None

    by_id = {id(c): (n, c) for n, c in children}
    for name, conv in children:
        if not isinstance(conv, nn.Conv1D):
            continue
        bn_entry = by_id.get(only_consumer(conv))
        bn = bn_entry[1] if bn_entry else None
        why = _why_not(conv, bn)
        if why is None and len(calls.get(id(bn), [])) != 1:
            why = "the BatchNorm block also runs elsewhere"
        if why is not None:
            report.left.append((f"{path}{name}", why + " (as traced)"))
            continue
        act_entry = by_id.get(only_consumer(bn))
        act = act_entry[1] if act_entry and _is_relu(act_entry[1]) and not bn.fuse_relu else None
        if act is not None and len(calls.get(id(act), [])) != 1:
            act = None  # the relu block also runs elsewhere: keep it, fuse conv + bn only
        replaced = [(name, conv), (bn_entry[0], bn)] + ([(act_entry[0], act)] if act else [])
        _set_child(block, name, _fused_from(conv, bn, act is not None or bn.fuse_relu))
        _set_child(block, bn_entry[0], _Identity(prefix=bn.prefix))
        if act is not None:
            _set_child(block, act_entry[0], _Identity(prefix=act.prefix))
        if not trace.unchanged():
            for child_name, original in replaced:
                _set_child(block, child_name, original)
            report.left.append((f"{path}{name}", "fusing changed the model's output (an output "
                                "of the run is also used outside blocks): left unchanged"))
            continue
        report.fused.append((f"{path}{name}", _describe(conv, bn, act)))


def _added(sym):
    """(lhs, rhs) when sym is the single output of an elementwise add, else None."""
    if not isinstance(sym, mx.sym.Symbol) or len(sym.list_outputs()) != 1:
        return None
    graph = json.loads(sym.tojson())
    node = graph["nodes"][graph["heads"][0][0]]
    if node["op"] not in ("elemwise_add", "_Plus", "_plus"):
        return None
    children = sym.get_children()
    if children is None or len(children.list_outputs()) != 2:
        return None
    return children[0], children[1]


class _JoinSymbols:
    """``mx.sym`` as a custom HybridBlock's hybrid_forward sees it after fuse(): the same module,
    except that a relu of an elementwise add (``F.relu(a + b)``, ``F.Activation(a + b,
    act_type='relu')``: the residual join of a hand-written block) builds fusedres's add+relu
    from the add's own inputs, one pass instead of two. Everything else is mx.sym itself."""

    def __init__(self, block):
        self._block, self.rewrites = block, 0

    def __getattr__(self, name):
        return getattr(mx.sym, name)

    def _join(self, data, kwargs):
        pair = _added(data)
        if pair is None or set(kwargs) - {"name"}:
            return None
        self.rewrites += 1
        ctx = params_context(self._block.collect_params().values())
        return ops.run_add_relu(mx.sym, pair[0], pair[1], name=kwargs.get("name"), ctx=ctx)

    def relu(self, data, **kwargs):
        joined = self._join(data, kwargs)
        return joined if joined is not None else mx.sym.relu(data, **kwargs)

    def Activation(self, data=None, act_type=None, **kwargs):
        joined = self._join(data, kwargs) if act_type == "relu" else None
        return joined if joined is not None else mx.sym.Activation(data, act_type=act_type,
                                                                   **kwargs)


def _fuse_joins(block, path, report, outside):
    """Makes a custom HybridBlock's symbolic forward (hybridized: what runs) build its relu(a + b)
    joins as fusedres's add+relu, when one symbolic pass of its forward has such a join. Same
    function; imperative calls run the code as written. outside: ids of the Parameters of blocks
    outside this one (a block sharing them is left alone)."""
    if not isinstance(block, HybridBlock) or "hybrid_forward" in block.__dict__:
        return
    if any(id(p) in outside for p in block.collect_params().values()):
        return
    forward = block.hybrid_forward
    try:
        # Code that tells mx.sym from mx.nd by identity would take its NDArray branch with the
        # stand-in module: such blocks are left as they are.
        if re.search(r"\bF\s*(is|==|!=)|(is|==|!=)\s*F\b", inspect.getsource(forward)):
            return
    except (OSError, TypeError):
        return
    try:
        params = [p for p in inspect.signature(forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return
    inputs = [p.name for p in params[1:] if p.name not in block._reg_params]  # after F
    if len(inputs) != 1:  # the probe below feeds one input
        return
    probe = _JoinSymbols(block)
    try:
        forward(probe, mx.sym.var(inputs[0]),
                **{n: p.var() for n, p in block._reg_params.items()})
    except Exception:  # noqa: BLE001  (a forward we cannot run symbolically: leave it)
        return
    if not probe.rewrites:
        return

    def hybrid_forward(F, *args, **kwargs):
        return forward(_JoinSymbols(block) if F is mx.sym else F, *args, **kwargs)
    object.__setattr__(block, "hybrid_forward", hybrid_forward)
    report.joins.append((path.rstrip(".") or "(the model)",
                         f"{probe.rewrites} relu(a + b) in {type(block).__name__}."
                         "hybrid_forward as fused add+relu (hybridized)"))


def _set_child(block, name, child):
    # Block.__setattr__ refuses to change an attribute's type, so set both places directly.
    block._children[name] = child
    object.__setattr__(block, name, child)


def _fuse_tree(block, path, report, trace):
    if isinstance(block, (nn.Sequential, nn.HybridSequential)):
        _fuse_sequential(block, path, report, trace)
        return
    for name, child in list(block._children.items()):
        pool = _pooling(child, f"{path}{name}", report)
        if pool is not None:  # the same function: safe whatever the forward code does
            _set_child(block, name, pool)
            continue
        _fuse_tree(child, f"{path}{name}.", report, trace)
    if type(block) not in (Block, HybridBlock) and block._children:
        _fuse_custom(block, path, report, trace)
        _fuse_joins(block, path, report, _outside_params(report.root, block))


def _outside_params(root, block):
    """ids of the Parameters held by blocks of root outside block's subtree."""
    inside = {id(b) for b in _walk(block)}
    found = set()

    def visit(b):
        if id(b) in inside:
            return
        found.update(id(p) for p in b._reg_params.values())
        for c in b._children.values():
            visit(c)
    visit(root)
    return found


def fuse(net, sample=None):
    """Replace every fusable ``Conv1D -> BatchNorm (-> relu)`` run in ``net`` in place, and
    every stock ``nn.MaxPool1D``/``nn.AvgPool1D`` (NCW) with fusedres's (same function; MXNet's
    own 1-D pooling is slow on the plain arrays the fused ops produce).

    Parameters
    ----------
    net : Block
        A Gluon model; its Parameters (initialized or deferred) become the fused blocks'.
    sample : NDArray, optional
        One input batch. Needed to fuse runs called from a custom Block's ``forward``: one
        inference-mode forward pass is traced to see which block feeds which. Runs inside
        ``Sequential``/``HybridSequential`` need no sample.

    Returns
    -------
    FuseReport
        What was fused and what was left unchanged, with the reason.

    The Parameters stay the same objects, so a ``gluon.Trainer`` made before still applies.
    ``load_unfused_parameters(net, path)`` loads ``.params`` files saved from the stock model
    (``save_parameters`` names change where blocks were merged).
    """
    report = FuseReport()
    report.root = net
    before = {}  # a shared Parameter has several structural names
    for name, p in net._collect_params_with_prefix().items():
        before.setdefault(id(p), []).append(name)
    _fuse_tree(net, "", report, _Trace(net, sample) if sample is not None else None)
    for b in _walk(net):
        if isinstance(b, HybridBlock):
            b._clear_cached_op()
    old_map = getattr(net, _PARAM_MAP_ATTR, {})
    new_map = {}
    for name, p in net._collect_params_with_prefix().items():
        # The fused blocks hold the original Parameter objects: map by identity.
        new_map[name] = [o for old in before[id(p)] for o in old_map.get(old, [old])]
    object.__setattr__(net, _PARAM_MAP_ATTR, new_map)
    return report


def load_unfused_parameters(net, path, ctx=None, allow_missing=False, ignore_extra=False):
    """Load a ``.params`` file saved (``save_parameters``) from the stock model into a model
    that ``fuse`` has changed, mapping each fused parameter to its original name."""
    mapping = getattr(net, _PARAM_MAP_ATTR, None)
    if mapping is None:
        raise ValueError("net has not been through fusedres.fuse(); use net.load_parameters")
    loaded = mx.nd.load(path)
    params = net._collect_params_with_prefix()
    found = {n: next((o for o in mapping[n] if o in loaded), None) for n in params}
    missing = [mapping[n][0] for n in params if found[n] is None]
    if missing and not allow_missing:
        raise ValueError(f"{path} has no value for {', '.join(missing)}")
    extra = set(loaded) - {o for n in params for o in mapping[n]}
    if extra and not ignore_extra:
        raise ValueError(f"{path} has parameters the model lacks: {', '.join(sorted(extra))}")
    for name, p in params.items():
        if found[name] is not None:
            p._load_init(loaded[found[name]], ctx, cast_dtype=False)
