"""Data-parallel training of fused models: several CPU contexts in one process, and dist_sync
with ps-lite (scheduler + 1 server + 2 workers on 127.0.0.1).

What is genuinely equal (see tests/dist_worker.py for the full argument):

* With batch statistics (the default), every device/worker normalizes with the statistics of
  its own shard and keeps its own running statistics; only gradients are summed. Data-parallel
  training therefore equals *sharded* single-context training: each shard's forward+backward
  with its own batch statistics and its own running statistics, gradients accumulated, one
  optimizer step on the global batch (``dist_worker.train_reference(..., num_shards=2)``) -- and not
  training on the whole global batch at once, which these tests also show to differ.
* Gluon's Trainer, at its first ``step()``, broadcasts every parameter, the grad_req='null'
  running statistics included, from the first context (or from rank 0) to the others. That is
  MXNet's behaviour and the reference reproduces it.
* With ``use_global_stats=True`` there are no batch statistics; data-parallel training equals
  plain single-context training on the global batch, and the running statistics do not move.

All of these hold exactly here (the same kernels run on the same shard shapes, and a sum of two
gradients does not depend on its order), so the tolerances are tight.
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

import dist_worker as dw
from helpers import TOL

STEPS = 3
CTXS = [mx.cpu(0), mx.cpu(1)]
RTOL, ATOL = TOL["data_parallel"]
WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def problem():
    return dw.make_problem(batch=16, seed=0)


def _is_running_stat(name):
    return name.endswith(("running_mean", "running_var"))


def _assert_params_close(actual, expected, what):
    assert set(actual) >= set(expected), what
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what}: {name}")


def _max_diff(a, b, names):
    return max(float(np.max(np.abs(a[n] - b[n]))) for n in names)


# ------------------------------------------------------------------ several contexts, one process

@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_multi_context_batch_stats_equals_sharded_reference(problem, hybridize):
    x, y, params = problem
    per_ctx = dw.train_data_parallel(params, x, y, CTXS, STEPS, hybridize=hybridize)
    shared, running = dw.train_reference(params, x, y, STEPS, num_shards=2,
                                         hybridize=hybridize)
    learned = sorted(shared)
    stats = sorted(n for n in params if _is_running_stat(n))
    assert len(learned) == 10 and len(stats) == 4

    for i, snap in enumerate(per_ctx):
        # The learned parameters: the same on both contexts, and those of sharded training.
        _assert_params_close(snap, shared, f"cpu({i}) learned parameters")
        # The running statistics: each context's own, as its own shard made them.
        _assert_params_close(snap, running[i], f"cpu({i}) running statistics")
        assert _max_diff(snap, params, learned) > 1e-3, "training did not move the parameters"
        assert _max_diff(snap, params, stats) > 1e-3, "the running statistics did not move"
    # Per-device statistics really are per device...
    assert _max_diff(per_ctx[0], per_ctx[1], stats) > 1e-4
    # ...and so data parallelism with batch statistics is not global-batch training.
    full, _ = dw.train_reference(params, x, y, STEPS, num_shards=1, hybridize=hybridize)
    assert _max_diff(per_ctx[0], full, learned) > 1e-3


def test_multi_context_global_stats_equals_global_batch(problem):
    x, y, params = problem
    per_ctx = dw.train_data_parallel(params, x, y, CTXS, STEPS, use_global_stats=True)
    full, running = dw.train_reference(params, x, y, STEPS, num_shards=1,
                                       use_global_stats=True)
    stats = {n: v for n, v in params.items() if _is_running_stat(n)}
    for i, snap in enumerate(per_ctx):
        _assert_params_close(snap, full, f"cpu({i}) learned parameters")
        # use_global_stats: the running statistics are used, never updated.
        for name, value in stats.items():
            np.testing.assert_array_equal(snap[name], value, err_msg=f"cpu({i}) {name}")
    assert _max_diff(per_ctx[0], params, sorted(full)) > 1e-3


# ------------------------------------------------------------------ dist_sync with ps-lite

def _dist_kvstore_built():
    try:
        return mx.runtime.Features().is_enabled("DIST_KVSTORE")
    except Exception:  # pragma: no cover - very old MXNet
        return False


def _private_netns_prefix():
    """``unshare -rn`` (a user + network namespace of our own, loopback only) when the kernel
    allows it: then even ps-lite's port probing happens where nothing else can see it, and no
    port can clash with another job. Otherwise the job runs on the host's 127.0.0.1."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    try:
        ok = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [unshare, "-rn"] if ok.returncode == 0 else []


def _run_dist_job(tmp_path, params, x, y, use_global_stats, timeout_s=45):
    inp = tmp_path / "input.npz"
    np.savez(inp, x=x, y=y, steps=STEPS, use_global_stats=use_global_stats,
             **{f"param:{k}": v for k, v in params.items()})
    prefix = _private_netns_prefix()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               FUSEDRES_NETNS="1" if prefix else "0")
    for key in [k for k in env if k.startswith(("DMLC_", "PS_"))]:
        del env[key]  # nothing inherited from an outer job
    cmd = prefix + [sys.executable, str(WORKER), "launch", str(inp), str(tmp_path),
                    str(timeout_s)]
    # The launcher kills its own children after timeout_s; its process group (started here,
    # with a new session) is killed below in any case, so nothing outlives the test.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s + 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            try:  # anything the launcher left behind in its group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(tmp_path.glob("*.log")))
    assert proc.returncode == 0, f"dist job failed ({proc.returncode}):\n{out.decode()}\n{logs}"
    results = []
    for rank in range(2):
        with np.load(tmp_path / f"worker{rank}.npz") as f:
            results.append({k: f[k] for k in f.files})
    assert [int(r["rank"]) for r in results] == [0, 1]
    assert all(int(r["num_workers"]) == 2 for r in results)
    return results


needs_dist = pytest.mark.skipif(not _dist_kvstore_built(),
                                reason="MXNet built without DIST_KVSTORE")


@needs_dist
def test_dist_sync_batch_stats_equals_sharded_reference(problem, tmp_path):
    x, y, params = problem
    workers = _run_dist_job(tmp_path, params, x, y, use_global_stats=False)
    shared, running = dw.train_reference(params, x, y, STEPS, num_shards=2)
    for name in shared:
        # Both workers pull the same weights from the server: identical, bit for bit.
        np.testing.assert_array_equal(workers[0][name], workers[1][name], err_msg=name)
    for rank, w in enumerate(workers):
        _assert_params_close(w, shared, f"worker {rank} learned parameters")
        _assert_params_close(w, running[rank], f"worker {rank} running statistics")
        assert np.all(np.isfinite(w["losses"]))
    stats = sorted(running[0])
    assert _max_diff(workers[0], workers[1], stats) > 1e-4, "running stats are per worker"
    assert _max_diff(workers[0], params, sorted(shared)) > 1e-3


@needs_dist
def test_dist_sync_global_stats_equals_global_batch(problem, tmp_path):
    x, y, params = problem
    workers = _run_dist_job(tmp_path, params, x, y, use_global_stats=True)
    full, _ = dw.train_reference(params, x, y, STEPS, num_shards=1, use_global_stats=True)
    for name in params:
        np.testing.assert_array_equal(workers[0][name], workers[1][name], err_msg=name)
    _assert_params_close(workers[0], full, "dist_sync learned parameters")
    for name, value in params.items():
        if _is_running_stat(name):
            np.testing.assert_array_equal(workers[0][name], value, err_msg=name)
