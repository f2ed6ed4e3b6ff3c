"""Data-parallel training (TrainStep(comm=), fastrnn/_dist.py).

In process: every backend's train_grad + apply_update equals its
train_step. Under MPI: the test starts `mpiexec -n 2` on this machine
(tests/_mpi_worker.py; skipped, with the reason, without mpi4py or an
mpiexec) and checks every rank against one process trained here on the
concatenated batches: parameters, optimizer state, loss, gradient norm,
clipped and skipped after each step, within the table's tolerance (float64
1e-9, float32 1e-4).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastrnn as fr
from conftest import assert_close
import _mpi_worker as W

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def mpiexec():
    """The mpiexec beside this Python (the mpich wheel's), else on PATH."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install -e '.[mpi]')")
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = exe if os.access(exe, os.X_OK) else shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpiexec found (pip install -e '.[mpi]' installs MPICH's)")
    return exe


def run_ranks(args, n=2, timeout=600, check=True):
    """`mpiexec -n n python args...` on this machine, one thread per rank."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", HYDRA_IFACE="lo")
    p = subprocess.run([mpiexec(), "-n", str(n), sys.executable] + list(args),
                       env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert p.returncode == 0, f"mpiexec failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


# ---------------------------------------------------------------------------
# the split every backend provides
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_train_grad_then_apply_update_equals_train_step(backend, cell):
    rng = np.random.default_rng(3)
    T, B = 4, 3
    x = rng.standard_normal((T, B, 3))
    y = rng.integers(0, 4, (T, B))
    Layer = fr.LSTM if cell == "lstm" else fr.RNN
    got = []
    for split in (False, True):
        model = fr.SequenceModel(Layer(3, 5, dtype=np.float64, seed=2, backend=backend), 4)
        step = fr.TrainStep(model, fr.Adam(0.05), clip=fr.ClipNorm(0.3))
        stats = []
        for i in range(3):
            if split:
                be, st0 = model._be, np.zeros((2 if cell == "lstm" else 1, 1, B, 5))
                r = be.train_grad(model._spec, model._buf, x, np.full(B, T), st0, y,
                                  state_clip=None, ctx=step._ctx)
                u = be.apply_update(model._spec, model._buf, step._opt, i + 1,
                                    np.array(r["grad"]), r["loss"], opt="adam",
                                    hyper=step.optimizer.hyper, clip="norm",
                                    limit=0.3, ctx=step._ctx)
                stats.append((r["loss"], u["grad_norm"], u["clipped"], u["skipped"]))
            else:
                q = step(x, y)
                stats.append((q.loss, q.grad_norm, q.clipped, q.skipped))
        got.append((model._params().copy(), step.opt_state.copy(), np.array(stats, float)))
    for a, b, what in zip(got[0], got[1], ("parameters", "opt_state", "stats")):
        assert_close(b, a, np.float64, err_msg=what)
    assert got[0][2][:, 2].all()     # the clipping was exercised


def test_comm_must_be_a_communicator():
    model = fr.SequenceModel(fr.RNN(2, 3, backend="numpy"), 2)
    with pytest.raises(TypeError, match="comm: expected an mpi4py communicator"):
        fr.TrainStep(model, fr.SGD(0.1), comm=object())


# ---------------------------------------------------------------------------
# two ranks against one process
# ---------------------------------------------------------------------------
BACKENDS = [b for b in ("numpy", "numba", "c") if fr.available_backends()[b][0]]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("mpi")
    run_ranks([os.path.join(HERE, "_mpi_worker.py"), str(out)] + BACKENDS)
    return [dict(np.load(out / f"rank{r}.npz")) for r in (0, 1)]


def single_process(case, backend):
    """One process, the concatenated batches, rank 0's seed."""
    model, optim, clipper = W.build(case, backend, seed=10)
    step = fr.TrainStep(model, optim, clip=clipper)
    data, rows = W.batches(case)
    stats = []
    for x, y, ln in data:
        q = step(x, y, lengths=ln)
        stats.append([q.loss, q.grad_norm, q.clipped, q.skipped])
    hx = q.hx if isinstance(q.hx, tuple) else (q.hx,)
    return model, step, np.array(stats), np.stack(hx), rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(W.CASES))
def test_two_ranks_equal_one_process_on_the_concatenated_batch(ranks, case, backend):
    model, step, stats, hx, rows = single_process(case, backend)
    key = f"{backend}/{case}"
    dt = model.dtype
    for r, got in enumerate(ranks):
        msg = f"rank {r}, {key}"
        assert got[key + "/params"].dtype == dt
        assert_close(got[key + "/params"], model._params(), dt, msg + " params")
        assert_close(got[key + "/opt"], step.state_dict()["opt_state"], dt,
                     msg + " opt_state")
        assert int(got[key + "/steps"]) == step.steps, msg
        s = got[key + "/stats"]
        np.testing.assert_array_equal(s[:, 2:], stats[:, 2:], err_msg=msg + " clipped/skipped")
        fin = np.isfinite(stats[:, :2])
        np.testing.assert_array_equal(np.isfinite(s[:, :2]), fin, err_msg=msg)
        assert_close(s[:, :2][fin], stats[:, :2][fin], dt, msg + " loss/grad_norm")
        a = sum(rows[:r])
        assert_close(got[key + "/hx"], hx[:, :, a:a + rows[r]], dt, msg + " hx")


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(ranks):
    for got in ranks:
        for be in BACKENDS:
            s = got[f"{be}/rnn_nan/stats"]
            np.testing.assert_array_equal(s[:, 3], [0, 1, 0])
            assert int(got[f"{be}/rnn_nan/steps"]) == W.STEPS - 1


def test_ranks_with_different_models_are_refused_on_every_rank(ranks):
    for got in ranks:
        msg = str(got["refused"])
        assert "the ranks' models differ" in msg and "cell" in msg, msg


def test_an_uncaught_exception_on_one_rank_aborts_every_rank():
    script = ("import numpy as np, fastrnn as fr\n"
              "from mpi4py import MPI\n"
              "comm = MPI.COMM_WORLD\n"
              "m = fr.SequenceModel(fr.RNN(3, 4, backend='numpy'), 2)\n"
              "step = fr.TrainStep(m, fr.SGD(0.1), comm=comm)\n"
              "if comm.Get_rank() == 1:\n"
              "    raise KeyError('between two steps')\n"
              "step(np.zeros((2, 2, 3)), np.zeros((2, 2), int))\n")
    p = run_ranks(["-c", script], timeout=120, check=False)  # rank 0 would wait for ever
    assert p.returncode != 0
    assert "rank 1 of 2 stopped on KeyError; aborting every rank" in p.stderr


def test_a_rank_that_raises_makes_every_rank_raise(ranks):
    assert str(ranks[1]["failed"]).startswith("ValueError: y: class ids")
    assert str(ranks[0]["failed"]).startswith("RuntimeError: TrainStep: rank 1 failed")
    assert all(bool(got["unchanged"]) for got in ranks)


# ---------------------------------------------------------------------------
# the command line: `mpiexec -n 2 fastrnn train` is one process's run
# ---------------------------------------------------------------------------
TEXT = ("It was the best of times, it was the worst of times, it was the age of "
        "wisdom, it was the age of foolishness.\n") * 12


def _checkpoint(out):
    ck = fr.load(os.path.join(out, "checkpoint.npz"))
    return ck


def _assert_same_checkpoint(got, want):
    a, b = _checkpoint(got), _checkpoint(want)
    assert a.step == b.step and a.train_step.steps == b.train_step.steps
    pa, pb = a.model.state_dict(), b.model.state_dict()
    for k in pb:
        assert_close(pa[k], pb[k], np.float64, k)
    assert_close(a.train_step.opt_state, b.train_step.opt_state, np.float64, "opt_state")
    ra, rb = a.extra["rng"], b.extra["rng"]
    assert ra.bit_generator.state == rb.bit_generator.state
    if b.extra.get("hx") is not None:      # the carried state, all rows
        for x, y in zip(np.atleast_1d(a.extra["hx"]), np.atleast_1d(b.extra["hx"])):
            assert_close(np.asarray(x), np.asarray(y), np.float64, "hx")
    steps = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))
              if '"type": "step"' in line] for d in (got, want)]
    assert [s["step"] for s in steps[0]] == [s["step"] for s in steps[1]]
    assert_close(np.array([s["loss"] for s in steps[0]]),
                 np.array([s["loss"] for s in steps[1]]), np.float64, "losses")


@pytest.mark.parametrize("task", ["adding", "char"])
def test_cli_two_ranks_equal_one_process_and_resume_with_another_count(
        tmp_path, capsys, monkeypatch, task):
    from fastrnn import cli
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # no pictures
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    args = ["--T", "8", "--hidden", "6", "--batch", "5", "--eval-every", "5",
            "--test-size", "50", "--progress", "log", "--no-stop", "--dtype", "float64",
            "--task", task]
    if task == "char":
        (tmp_path / "text.txt").write_text(TEXT)
        args += ["--text", str(tmp_path / "text.txt")]
    d = {k: str(tmp_path / k) for k in ("one10", "one20", "two10", "two20")}
    assert cli.main(["train", *args, "--steps", "10", "--out", d["one10"]]) == 0
    assert cli.main(["train", *args, "--steps", "20", "--out", d["one20"]]) == 0
    shutil.copytree(d["one10"], d["two20"])
    p = run_ranks(["-m", "fastrnn", "train", *args, "--steps", "10", "--out", d["two10"]])
    assert p.stdout.count("fastrnn train:") == 1          # rank 0 alone prints
    _assert_same_checkpoint(d["two10"], d["one10"])
    # resumed with another number of ranks: 2 -> 1 and 1 -> 2
    assert cli.main(["train", "--resume", d["two10"], "--steps", "20"]) == 0
    _assert_same_checkpoint(d["two10"], d["one20"])
    run_ranks(["-m", "fastrnn", "train", "--resume", d["two20"], "--steps", "20"])
    _assert_same_checkpoint(d["two20"], d["one20"])


def test_cli_under_mpiexec_refuses_other_commands_and_too_small_batches(tmp_path):
    mpiexec()
    env = dict(os.environ, PYTHONPATH=ROOT, PMI_SIZE="2")    # as a launcher sets it
    p = subprocess.run([sys.executable, "-m", "fastrnn", "compare"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "only `fastrnn train` runs data-parallel" in p.stderr
    with pytest.raises(AssertionError, match="--batch: 1 rows cannot be split over 2"):
        run_ranks(["-m", "fastrnn", "train", "--T", "4", "--hidden", "3", "--batch", "1",
                   "--steps", "1", "--out", str(tmp_path / "r")])


class _FakeComm:
    """Rank `rank` of `size`, for the row split (no MPI needed)."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size


@pytest.mark.parametrize("task_name", ["adding", "memorization"])
def test_ranks_split_each_global_batch_into_disjoint_row_blocks(task_name):
    from fastrnn import tasks
    from fastrnn.cli_mpi import Parallel
    task = tasks.make_task(task_name, 5)
    x, y = task.batch(np.random.default_rng(0), 7)
    for n in (1, 2, 3, 7):
        parts = [Parallel(_FakeComm(r, n)).local_batch(task, x, y) for r in range(n)]
        assert all(p[0].shape[1] >= 1 for p in parts)
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts], axis=1), x)
        axis = 1 if task.readout == "all" else 0
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts], axis=axis), y)
        hx = (np.arange(2 * 7 * 3.0).reshape(2, 7, 3), np.ones((2, 7, 3)))
        states = [Parallel(_FakeComm(r, n)).local_state(hx) for r in range(n)]
        for j in range(2):
            np.testing.assert_array_equal(np.concatenate([s[j] for s in states], axis=1),
                                          hx[j])
