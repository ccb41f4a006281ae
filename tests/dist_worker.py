"""A small fused model and how to train it: in one process, on several contexts, or as one
worker of a ``dist_sync`` job.

Imported by tests/test_data_parallel.py for the model and the single-process references, and
run as a script in two ways:

    python tests/dist_worker.py launch INPUT.npz OUT_DIR TIMEOUT_S
        start a ps-lite job on 127.0.0.1 (scheduler, 1 server, 2 workers running the line
        below), wait for it, and kill whatever is left after TIMEOUT_S;
    python tests/dist_worker.py INPUT.npz OUT_DIR
        one worker (DMLC_ROLE=worker and the rest of the ps-lite environment set).

INPUT.npz holds the global batch (``x``, ``y``), the initial parameters (``param:<name>``) and
the settings (``steps``, ``use_global_stats``). The worker trains on its shard of the global
batch (shard ``kv.rank`` of ``kv.num_workers``) and writes ``OUT_DIR/worker<rank>.npz`` with its
final parameters, running statistics included.

Batch-statistics semantics (why the references below look the way they do): in data-parallel
training every device/worker normalizes with the BatchNorm statistics of *its own shard*, and
keeps *its own* running statistics (aux states are neither reduced nor synchronized). Only the
gradients are summed. (One wrinkle, Gluon's and not fusedres's: the Trainer's first step()
broadcasts every parameter, running statistics included, from the first context or from
rank 0 to all the others, once.) So, with batch statistics, data-parallel training is exactly
"compute the gradients of each shard separately, with that shard's batch statistics, and sum
them", which is what ``train_reference(..., num_shards=2)`` does; it is *not* single-process
training on the whole global batch. With ``use_global_stats=True`` the forward pass is
per-sample (no batch statistics), the running statistics never change, and data-parallel
training equals plain single-process training on the global batch
(``train_reference(..., num_shards=1)``).
"""
import os
import socket
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from fusedres.nn import AddReLU, ConvBNReLU1D

IN_CHANNELS, CHANNELS, WIDTH, CLASSES = 4, 8, 16, 3
LEARNING_RATE, MOMENTUM = 0.05, 0.9


class ResNet1D(gluon.HybridBlock):
    """conv1d_bn_relu -> conv1d_bn_relu, residual join by add_relu, then Dense."""

    def __init__(self, use_global_stats=False, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.c1 = ConvBNReLU1D(CHANNELS, 3, padding=1, in_channels=IN_CHANNELS,
                                   use_global_stats=use_global_stats)
            self.c2 = ConvBNReLU1D(CHANNELS, 3, padding=1, in_channels=CHANNELS,
                                   use_global_stats=use_global_stats)
            self.join = AddReLU()
            self.fc = gluon.nn.Dense(CLASSES, in_units=CHANNELS * WIDTH)

    def hybrid_forward(self, F, x):
        h = self.c1(x)
        return self.fc(self.join(h, self.c2(h)))


def make_problem(batch=16, seed=0):
    """A fixed global batch and fixed initial parameters (running statistics not at their
    defaults, so that use_global_stats=True normalizes with something non-trivial)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, IN_CHANNELS, WIDTH)).astype(np.float32)
    y = rng.integers(0, CLASSES, batch).astype(np.float32)
    net = ResNet1D(prefix="net_")
    params = {}
    for name, p in net.collect_params().items():
        if name.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, p.shape)
        elif name.endswith("running_mean"):
            value = rng.standard_normal(p.shape) * 0.1
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, p.shape)
        else:
            fan_in = int(np.prod(p.shape[1:])) if len(p.shape) > 1 else 1
            value = rng.standard_normal(p.shape) / np.sqrt(fan_in)
        params[name] = value.astype(np.float32)
    return x, y, params


def build(params, ctx, use_global_stats=False, hybridize=False):
    net = ResNet1D(use_global_stats=use_global_stats, prefix="net_")
    net.initialize(ctx=ctx)
    for name, p in net.collect_params().items():
        p.set_data(mx.nd.array(params[name]))
    if hybridize:
        net.hybridize()
    return net


def make_trainer(net, kvstore="device"):
    return gluon.Trainer(net.collect_params(), "sgd",
                         {"learning_rate": LEARNING_RATE, "momentum": MOMENTUM},
                         kvstore=kvstore)


_loss = gluon.loss.SoftmaxCrossEntropyLoss()


def snapshot(net, ctx_index=0):
    return {name: p.list_data()[ctx_index].asnumpy().copy()
            for name, p in net.collect_params().items()}


def shard(array, index, count):
    n = len(array) // count
    return array[index * n:(index + 1) * n]


def train_step(net, trainer, x, y, global_batch):
    """One step on this process's contexts; the loss is summed over samples, and the step
    divides by the *global* batch size (dist_sync sums the workers' gradients)."""
    ctxs = net.collect_params().list_ctx()
    xs = gluon.utils.split_and_load(mx.nd.array(x), ctxs, even_split=True)
    ys = gluon.utils.split_and_load(mx.nd.array(y), ctxs, even_split=True)
    with autograd.record():
        losses = [_loss(net(xi), yi) for xi, yi in zip(xs, ys)]
    autograd.backward(losses)
    trainer.step(global_batch)
    return float(sum(l.sum().asscalar() for l in losses))


def train_data_parallel(params, x, y, ctxs, steps, use_global_stats=False, hybridize=False):
    """Gluon data parallelism in one process. Returns one snapshot per context."""
    net = build(params, ctxs, use_global_stats, hybridize)
    trainer = make_trainer(net)
    for _ in range(steps):
        train_step(net, trainer, x, y, len(x))
    return [snapshot(net, i) for i in range(len(ctxs))]


def train_reference(params, x, y, steps, num_shards=1, use_global_stats=False,
                    hybridize=False):
    """Single-context reference for data parallelism over ``num_shards`` devices/workers.

    Each step runs forward+backward on every shard in turn with gradient accumulation
    (grad_req='add'), so the gradients are the sum of per-shard gradients each computed with
    that shard's own batch statistics, and swaps in that shard's own running statistics
    around its forward, as a separate device/worker would keep them (except that the Trainer's
    first step overwrites every device's with the first device's; see below). Then one
    optimizer step over the global batch. ``num_shards=1`` is plain training on the global batch.

    Returns (shared parameters, [running statistics of each shard]).
    """
    net = build(params, mx.cpu(0), use_global_stats, hybridize)
    all_params = net.collect_params()
    running = {n: p for n, p in all_params.items() if p.grad_req == "null"}
    learned = {n: p for n, p in all_params.items() if p.grad_req != "null"}
    for p in learned.values():
        p.grad_req = "add"
    trainer = make_trainer(net, kvstore=None)
    per_shard = [{n: params[n].copy() for n in running} for _ in range(num_shards)]
    for step in range(steps):
        all_params.zero_grad()
        for k in range(num_shards):
            for n, p in running.items():
                p.set_data(mx.nd.array(per_shard[k][n]))
            with autograd.record():
                loss = _loss(net(mx.nd.array(shard(x, k, num_shards))),
                             mx.nd.array(shard(y, k, num_shards)))
            loss.backward()
            for n, p in running.items():
                per_shard[k][n] = p.data().asnumpy().copy()
        if step == 0:
            # Gluon's Trainer initializes its kvstore lazily, in the first step(), by
            # broadcasting *every* parameter from the first context (dist: from rank 0), the
            # grad_req='null' running statistics included. So after the first step's forward
            # every device/worker holds shard 0's running statistics.
            per_shard = [{n: v.copy() for n, v in per_shard[0].items()}
                         for _ in range(num_shards)]
        trainer.step(len(x))
    shared = {n: p.data().asnumpy().copy() for n, p in learned.items()}
    return shared, per_shard


def main(argv):
    """One dist_sync worker (DMLC_ROLE=worker is set by the launcher)."""
    inp, out_dir = argv[1], argv[2]
    with np.load(inp) as f:
        x, y = f["x"], f["y"]
        steps, use_global_stats = int(f["steps"]), bool(f["use_global_stats"])
        params = {k[len("param:"):]: f[k] for k in f.files if k.startswith("param:")}
    kv = mx.kv.create("dist_sync")
    rank, workers = kv.rank, kv.num_workers
    net = build(params, mx.cpu(0), use_global_stats)
    trainer = make_trainer(net, kvstore=kv)
    xs, ys = shard(x, rank, workers), shard(y, rank, workers)
    losses = [train_step(net, trainer, xs, ys, len(x)) for _ in range(steps)]
    out = snapshot(net)
    np.savez(f"{out_dir}/worker{rank}.npz", rank=rank, num_workers=workers,
             losses=np.array(losses), **out)
    # Everyone leaves together: the servers and the scheduler exit once all workers finalize.
    kv._barrier()
    print(f"worker rank {rank}/{workers} done, losses {losses}", flush=True)


def _bring_loopback_up():
    """In a fresh network namespace (``unshare -rn``) ``lo`` is down: bring it up."""
    import fcntl
    import struct
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, req))[1]
        if not flags & iff_up:
            fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _free_loopback_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(inp, out_dir, timeout_s, num_workers=2):
    """Scheduler + 1 server + ``num_workers`` workers, as dmlc_tracker's local launcher starts
    them (same DMLC_* environment), all on 127.0.0.1. Returns 0 when every process exited 0.

    Every ps-lite node binds its listening socket to 127.0.0.1: the scheduler to
    DMLC_PS_ROOT_URI, the others to DMLC_NODE_HOST. (ps-lite also probes for a free port number
    with a bind to port 0 that it closes without listening; under ``unshare -rn`` that happens
    inside a private network namespace too.) Server and scheduler are plain ``import mxnet``:
    with DMLC_ROLE set to server/scheduler, mxnet runs the node at import and exits after.
    """
    if os.environ.get("FUSEDRES_NETNS") == "1":
        _bring_loopback_up()
    env = dict(os.environ, DMLC_PS_ROOT_URI="127.0.0.1",
               DMLC_PS_ROOT_PORT=str(_free_loopback_port()), DMLC_NODE_HOST="127.0.0.1",
               DMLC_NUM_SERVER="1", DMLC_NUM_WORKER=str(num_workers),
               DMLC_JOB_CLUSTER="local", OMP_NUM_THREADS="1", MXNET_CPU_WORKER_NTHREADS="1",
               PS_VERBOSE="0")
    py = sys.executable
    roles = ([("scheduler", [py, "-c", "import mxnet"]), ("server", [py, "-c", "import mxnet"])]
             + [("worker", [py, os.path.abspath(__file__), inp, out_dir])] * num_workers)
    procs = []
    deadline = time.monotonic() + timeout_s
    try:
        for task_id, (role, cmd) in enumerate(roles):
            log = open(os.path.join(out_dir, f"{task_id}-{role}.log"), "wb")
            procs.append((role, subprocess.Popen(
                cmd, env=dict(env, DMLC_ROLE=role, DMLC_TASK_ID=str(task_id)),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)))
            log.close()
        while [p.poll() for _, p in procs].count(None):  # poll() every one of them
            failed = [(r, p.returncode) for r, p in procs if p.returncode not in (None, 0)]
            if failed:
                print(f"failed: {failed}", flush=True)
                return 1
            if time.monotonic() > deadline:
                print(f"timed out after {timeout_s} s", flush=True)
                return 124
            time.sleep(0.05)
        codes = [(r, p.returncode) for r, p in procs]
        print(f"exit codes {codes}", flush=True)
        return 0 if all(c == 0 for _, c in codes) else 1
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
        for _, p in procs:
            p.wait()


if __name__ == "__main__":
    if sys.argv[1] == "launch":
        sys.exit(launch(sys.argv[2], sys.argv[3], float(sys.argv[4])))
    try:
        main(sys.argv)
    except BaseException:
        # A plain exit would finalize ps-lite, which waits for the other nodes forever; leave
        # at once so that the launcher sees the failure and stops the rest.
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
