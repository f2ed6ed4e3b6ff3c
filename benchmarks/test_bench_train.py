"""Training-step benchmarks: fastrnn backends against PyTorch.

One training step = forward over T steps, loss, BPTT, optimizer update.
Setting: float32, T=100, I=32, O=10, cross-entropy with a target at every
step (readout="all"; loss = sum over time, mean over the batch), SGD lr=0.01,
nonlinearity tanh, grid B in {1, 16, 64} x H in {32, 128, 512}; cells rnn,
lstm and gru (the GRU against nn.GRU, on the backends that have the cell:
a backend without it is skipped with the reason).

Every benchmark first CHECKS its implementation: from the same weights and
data as the NumPy reference, one step on a fresh copy must give the
reference's loss and updated parameters (float32: rtol 1e-4 with an absolute
floor of 1e-4 * max|ref|), and the parameter update (new - old, i.e. -lr * the
gradient) must match the reference's to rtol 1e-3 (same floor rule). Only
then is it timed, on another instance warmed up (numba compiled) beforehand.

Implementations: the fastrnn backends by name, "torch", and "numba-mkl":
the numba backend with Intel MKL for its per-step products (the `mkl`
extra; skipped with the reason when MKL is not installed). "numba" is then
timed without MKL (the default install), so both sit side by side in one
run; extra_info records the GEMM engine and which products used MKL.

Results are grouped by (cell, B, H): benchmark.group = "rnn B=16 H=128" and
extra_info holds cell, backend, B, H, ...; benchmarks/report.py turns the
--benchmark-json output into tables.
"""
import functools
import itertools
import math
import os
import time
import warnings

import numpy as np
import pytest

import fastrnn as fr
from fastrnn._torch_ref import TorchTrainStep

try:
    import torch
except ImportError:  # PyTorch is optional: its cases are skipped
    torch = None

T, I, O = 100, 32, 10
LR = 0.01
DTYPE = np.float32
NONLINEARITY = "tanh"
BATCHES = (1, 16, 64)
HIDDENS = (32, 128, 512)
CELLS = ("rnn", "lstm", "gru")

# Tolerances of the pre-timing check, by dtype (relative; absolute floor =
# the same number times max|reference|).
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
# The parameter update lr*g is a small difference of two float32 numbers;
# its rounding error is ~ulp(max|p|), far below 1e-3 * max|lr*g|.
UPDATE_RTOL = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-7}

SLOW_CALL_S = 0.05    # a single call at least this slow -> pedantic rounds
MIN_SLOW_ROUNDS = 3   # never fewer rounds than this for a slow point
WARMUP_S = 0.2        # warm-up calls on the timed instance, up to this long
WARMUP_MAX_CALLS = 5


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def assert_close(actual, expected, rtol, err_msg=""):
    """rtol relative, with an absolute floor of rtol * max|expected|."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{err_msg}: shape {actual.shape} != expected {expected.shape}")
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol,
                               atol=rtol * max(scale, 1e-30), err_msg=err_msg)


def max_rel_err(actual, expected):
    """max|actual - expected| / max|expected| (recorded in extra_info)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    return err / scale if scale > 0 else err


def _copy_state(state):
    return {k: np.array(v, copy=True) for k, v in state.items()}


def _fr_cell_class(cell):
    """fr.RNN / fr.LSTM, or pytest.skip when the cell is not provided."""
    if cell == "rnn":
        return functools.partial(fr.RNN, nonlinearity=NONLINEARITY)
    if cell == "lstm":
        if not hasattr(fr, "LSTM"):
            pytest.skip("fastrnn has no LSTM yet")
        return fr.LSTM
    if cell == "gru":
        return fr.GRU
    raise ValueError(f"unknown cell {cell!r}")


def _skip_if_lstm(cell, backend, err):
    """A NotImplementedError skips an LSTM case (the LSTM may come later on
    some backends); for the RNN it is an error and propagates."""
    if cell == "lstm":
        pytest.skip(f"fr.LSTM on backend {backend!r} not implemented: {err}")
    raise err


def _fr_model(cell, H, backend, state=None):
    """SequenceModel on `backend`, loaded with `state` when given."""
    Cell = _fr_cell_class(cell)
    try:
        core = Cell(I, H, backend=backend, seed=0, dtype=DTYPE)
    except NotImplementedError as e:
        _skip_if_lstm(cell, backend, e)
    model = fr.SequenceModel(core, O, loss="cross_entropy", readout="all")
    if state is not None:
        model.load_state_dict(state)
    return model


def _data(B):
    """Identical inputs and targets for every implementation at batch B."""
    rng = np.random.default_rng(1000 + B)
    x = rng.standard_normal((T, B, I)).astype(DTYPE)
    y = rng.integers(0, O, size=(T, B)).astype(np.int64)
    return x, y


@functools.lru_cache(maxsize=None)
def reference(cell, B, H):
    """One step of the NumPy reference: (x, y, w0, loss, w1), all copies."""
    x, y = _data(B)
    model = _fr_model(cell, H, "numpy")
    w0 = _copy_state(model.state_dict())
    step = fr.TrainStep(model, fr.SGD(LR))
    try:
        res = step(x, y)
    except NotImplementedError as e:
        _skip_if_lstm(cell, "numpy", e)
    assert not res.skipped, "reference step skipped (non-finite loss/grad)"
    w1 = _copy_state(model.state_dict())
    for a in (x, y, *w0.values(), *w1.values()):
        a.setflags(write=False)
    return x, y, w0, float(res.loss), w1


# --------------------------------------------------------------------------
# the implementations under test: each returns (call, args, state_fn, info)
# call(*args) is one training step returning the loss; state_fn() returns
# the parameters by their state_dict names as NumPy arrays.
# --------------------------------------------------------------------------
def _versions():
    v = {"fastrnn": getattr(fr, "__version__", "?"), "numpy": np.__version__}
    try:
        import numba
        v["numba"] = numba.__version__
    except ImportError:
        pass
    if torch is not None:
        v["torch"] = torch.__version__
    return v


# "numba" and "numba-mkl" run the fastrnn backend "numba" with this GEMM
# engine of its per-step products (numba_cpu.set_gemm)
NUMBA_ENGINES = {"numba": "default", "numba-mkl": "mkl"}


def _numba_cpu():
    from fastrnn.backends import numba_cpu
    return numba_cpu


def make_fastrnn(cell, backend, B, H, x, y, w0):
    fr_backend = "numba" if backend in NUMBA_ENGINES else backend
    model = _fr_model(cell, H, fr_backend, state=w0)
    step = fr.TrainStep(model, fr.SGD(LR))

    def state_fn():
        return _copy_state(model.state_dict())

    def call(x, y):
        return step(x, y).loss

    info = {}
    if fr_backend == "numba":
        import numba
        info["threads"] = numba.get_num_threads()
        nb = _numba_cpu()
        info["gemm"] = nb.gemm_engine()
    # benchmark `step` itself (no wrapper) for the timing; `call` for checks
    return step, call, (np.array(x), np.array(y)), state_fn, info


def make_torch(cell, backend, B, H, x, y, w0):
    step = TorchTrainStep(cell, I, H, O, w0, nonlinearity=NONLINEARITY,
                          dtype=DTYPE, optimizer="sgd", lr=LR)
    info = {"threads": torch.get_num_threads()}
    return step, step, step.tensors(x, y), step.state_dict, info


def make_impl(cell, backend, B, H, x, y, w0):
    if backend == "torch":
        if torch is None:
            pytest.skip("PyTorch is not importable")
        return make_torch(cell, backend, B, H, x, y, w0)
    fr_backend = "numba" if backend in NUMBA_ENGINES else backend
    ok, why = fr.available_backends().get(fr_backend, (False, "not listed"))
    if not ok:
        pytest.skip(f"backend {fr_backend!r} unavailable: {why}")
    from fastrnn.backends import supports
    if cell == "gru" and not supports(fr_backend, "gru"):
        pytest.skip(f"backend {fr_backend!r} does not implement the GRU yet")
    if backend == "numba-mkl":
        from fastrnn.backends import _mkl
        ok, why = _mkl.status()
        if not ok:
            pytest.skip(f"numba-mkl: {why}")
    return make_fastrnn(cell, backend, B, H, x, y, w0)


@pytest.fixture
def gemm_engine(backend):
    """numba / numba-mkl: set the numba backend's GEMM engine for the test
    (restored after); other implementations: nothing."""
    if backend not in NUMBA_ENGINES:
        yield None
        return
    ok, why = fr.available_backends()["numba"]
    if not ok:
        pytest.skip(f"backend 'numba' unavailable: {why}")
    nb = _numba_cpu()
    try:
        prev = nb.set_gemm(NUMBA_ENGINES[backend])
    except RuntimeError as e:          # MKL not usable
        pytest.skip(f"{backend}: {e}")
    yield NUMBA_ENGINES[backend]
    nb.set_gemm(prev)


def check_against_reference(cell, backend, B, H):
    """One step on a fresh copy from the reference's weights and data."""
    x, y, w0, ref_loss, ref_w1 = reference(cell, B, H)
    _, call, args, state_fn, _ = make_impl(cell, backend, B, H, x, y, w0)
    try:
        loss = call(*args)
    except NotImplementedError as e:
        _skip_if_lstm(cell, backend, e)
    w1 = state_fn()
    rtol = RTOL[np.dtype(DTYPE)]
    urtol = UPDATE_RTOL[np.dtype(DTYPE)]
    where = f"{backend} vs numpy reference ({cell}, B={B}, H={H})"
    assert np.isfinite(loss), f"{where}: loss is {loss}"
    assert_close(loss, ref_loss, rtol, err_msg=f"{where}: loss")
    assert set(w1) == set(ref_w1), (
        f"{where}: parameter names {sorted(w1)} != {sorted(ref_w1)}")
    errs = {}
    for k in ref_w1:
        assert_close(w1[k], ref_w1[k], rtol,
                     err_msg=f"{where}: updated parameter {k}")
        upd, ref_upd = (w1[k].astype(np.float64) - w0[k],
                        ref_w1[k].astype(np.float64) - w0[k])
        assert_close(upd, ref_upd, urtol,
                     err_msg=f"{where}: update (new - old) of {k}")
        errs[k] = max_rel_err(upd, ref_upd)
    return {"ref_loss": ref_loss, "loss_rel_err": abs(loss - ref_loss)
            / max(abs(ref_loss), 1e-30), "max_update_rel_err": max(errs.values())}


# --------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------
def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    backends = [b.strip() for b in opt("bench_backends").split(",") if b.strip()]
    cells = [c.strip() for c in opt("bench_cells").split(",") if c.strip()]
    unknown = set(cells) - set(CELLS)
    if unknown:
        raise pytest.UsageError(f"--bench-cells: unknown {sorted(unknown)}; "
                                f"expected some of {CELLS}")
    params = [pytest.param(c, B, H, b, id=f"{c}-B{B}-H{H}-{b}")
              for c, B, H, b in itertools.product(cells, BATCHES, HIDDENS,
                                                  backends)]
    metafunc.parametrize("cell,B,H,backend", params)


def _mkl_paths_used(step):
    """Which per-step products the numba backend ran on MKL in the last call
    of this TrainStep ("-" for none)."""
    nb = _numba_cpu()
    flags = int(step._ctx["numba"].cfg[nb.C_MKL])
    names = [n for f, n in ((nb.MK_FWD, "fwd"), (nb.MK_BWD, "bwd"),
                            (nb.MK_PACKED, "packed")) if flags & f]
    return "+".join(names) or "-"


def test_train_step(benchmark, request, cell, B, H, backend, gemm_engine):
    benchmark.group = f"{cell} B={B} H={H}"
    check = check_against_reference(cell, backend, B, H)

    x, y, w0, _, _ = reference(cell, B, H)
    fn, call, args, state_fn, info = make_impl(cell, backend, B, H, x, y, w0)
    benchmark.extra_info.update(
        cell=cell, backend=backend, B=B, H=H, T=T, I=I, O=O,
        dtype=np.dtype(DTYPE).name, nonlinearity=NONLINEARITY,
        loss="cross_entropy", readout="all", optimizer=f"SGD(lr={LR})",
        check="passed", **check, **info, versions=_versions())
    if hasattr(os, "getloadavg"):  # other work on the machine skews timings
        benchmark.extra_info["loadavg_1min"] = round(os.getloadavg()[0], 2)

    # warm-up (numba compiles on the first call) and a first timing
    t0 = time.perf_counter()
    fn(*args)
    t1 = time.perf_counter() - t0
    if gemm_engine is not None:
        benchmark.extra_info["mkl_paths"] = _mkl_paths_used(fn)
        # the plan's choice of threads for this shape (numba backend)
        benchmark.extra_info["plan_serial"] = bool(fn._ctx["numba"].serial)
        try:
            import numba
            benchmark.extra_info["numba_threading_layer"] = numba.threading_layer()
        except ValueError:   # no parallel region has run in this process
            pass
    benchmark.extra_info["OPENBLAS_NUM_THREADS"] = os.environ.get(
        "OPENBLAS_NUM_THREADS", "unset")
    n = 1
    while n < WARMUP_MAX_CALLS and time.perf_counter() - t0 < WARMUP_S:
        t = time.perf_counter()
        fn(*args)
        t1 = min(t1, time.perf_counter() - t)
        n += 1

    if t1 >= SLOW_CALL_S:
        budget = request.config.getoption("bench_slow_budget")
        min_rounds = request.config.getoption("benchmark_min_rounds")
        rounds = max(MIN_SLOW_ROUNDS, min(min_rounds, math.ceil(budget / t1)))
        benchmark.extra_info["rounds_policy"] = f"pedantic rounds={rounds}"
        benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1)
    else:
        benchmark.extra_info["rounds_policy"] = "calibrated"
        benchmark(fn, *args)

    # Timing ran many SGD steps on random data: make sure they stayed finite
    # (fastrnn skips non-finite steps, which would time a different path).
    loss = call(*args)
    benchmark.extra_info["loss_after"] = float(loss)
    if not np.isfinite(loss):
        warnings.warn(f"{backend} {cell} B={B} H={H}: loss became {loss} "
                      "during timing; the timing may not be representative")
