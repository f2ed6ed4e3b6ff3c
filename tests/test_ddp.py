"""fastrnn.torch under torch.nn.parallel.DistributedDataParallel (gloo, CPU).

Two processes (tests/_ddp_worker.py) join a gloo group through a FileStore
in a temporary directory, on the loopback interface, and train
Embedding -> recurrent layer -> Linear under DDP, each on its half of every
global batch, from different initial parameters (DDP broadcasts rank 0's).
After each of the 5 steps (SGD with momentum, Adam) both ranks' parameters
and the mean of their losses must equal one process trained here on the
whole batch from rank 0's parameters (float64, 1e-9). torch.nn.LSTM runs
through the same harness as the control; the fastrnn cases cover the
LSTM (one layer; two bidirectional layers with buckets smaller than one
parameter), the RNN, gradient_as_bucket_view, find_unused_parameters,
static_graph, and the custom-op path that compiled code takes. The README's torchrun
example runs as written. Skipped, with the reason, without torch.distributed
or gloo; every wait has a timeout.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import _ddp_worker as W  # noqa: E402
from conftest import assert_close  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORLD = 2
TIMEOUT = 300   # seconds for the whole two-process run (the numba cache loads)


def _loopback():
    """The loopback interface's name (gloo is pinned to it), or skip."""
    names = [n for _, n in socket.if_nameindex()]
    for n in ("lo", "lo0"):
        if n in names:
            return n
    pytest.skip(f"no loopback interface named lo or lo0 among {names}")


def _require_gloo():
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available():
        pytest.skip("torch.distributed has no gloo backend in this torch build")


def _env():
    """The children's environment: this worktree first on the path, gloo on
    the loopback interface, one thread per process."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        GLOO_SOCKET_IFNAME=_loopback(), NUMBA_NUM_THREADS="1",
        OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs the two ranks once; returns [rank 0's results, rank 1's]."""
    _require_gloo()
    d = tmp_path_factory.mktemp("ddp")
    env = _env()
    outs = [str(d / f"rank{r}.pt") for r in range(WORLD)]
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_ddp_worker.py"), str(r),
         str(WORLD), str(d / "store"), outs[r]], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)]
    logs, deadline = [], time.monotonic() + TIMEOUT
    try:
        for p in procs:
            logs.append(p.communicate(
                timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the DDP ranks did not finish within {TIMEOUT} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed ({p.returncode}):\n{log}"
    return [torch.load(o) for o in outs]


@pytest.fixture(scope="module")
def data():
    return W.batches()


def _single(case, xs, ys, rows=slice(None)):
    model = W.build(case, seed=100)            # rank 0's initial parameters
    return W.train(case, model, W.optimizer(case, model.parameters()), xs, ys,
                   rows)


@pytest.mark.parametrize("case", list(W.CASES))
def test_ddp_equals_single_process(ranks, data, case):
    params, losses = _single(case, *data)
    for r, res in enumerate(ranks):
        got = res[case]
        assert len(got["params"]) == W.STEPS
        for s in range(W.STEPS):
            assert got["params"][s].keys() == params[s].keys()
            for k in params[s]:
                assert_close(got["params"][s][k].numpy(), params[s][k].numpy(),
                             np.float64, f"{case}: rank {r}, step {s}, {k}")
    # equal halves: the mean of the ranks' losses is the global batch's loss
    mean = [sum(res[case]["losses"][s] for res in ranks) / WORLD
            for s in range(W.STEPS)]
    assert_close(torch.stack(mean).numpy(), torch.stack(losses).numpy(),
                 np.float64, f"{case}: loss")
    if W.CASES[case][0] != "nn.LSTM":
        for r, res in enumerate(ranks):
            assert res[case]["flat"], (
                f"{case}: rank {r}'s parameters are no longer views of one "
                "flat buffer after DDP training")


def test_half_batch_alone_differs(data):
    """The comparison can fail: one rank's half trained alone (no
    all-reduce) ends elsewhere than the whole batch."""
    whole, _ = _single("lstm_adam_bucket_view", *data)
    half, _ = _single("lstm_adam_bucket_view", *data, rows=slice(0, W.B // WORLD))
    k = "rnn.weight_hh_l0"
    assert not np.allclose(half[-1][k].numpy(), whole[-1][k].numpy(),
                           rtol=1e-3, atol=1e-6)


def test_readme_torchrun_example_runs(tmp_path):
    """The README's DDP example, as written, under torchrun (two processes,
    standalone rendezvous on localhost)."""
    _require_gloo()
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("### PyTorch: `DistributedDataParallel`"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "ddp_train.py").write_text(code)
    # its own process group, so that a timeout ends torchrun's workers too
    p = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc-per-node", "2", "ddp_train.py"], cwd=tmp_path, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        log = p.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail(f"torchrun did not finish within {TIMEOUT} s")
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{log}"
    state = torch.load(tmp_path / "tagger.pt")
    assert state["rnn.weight_ih_l0"].shape == (4 * 32, 16)
