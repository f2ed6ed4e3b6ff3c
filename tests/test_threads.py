"""The numba backend and threads: bitwise the same results whatever the
thread counts (NUMBA_NUM_THREADS, OPENBLAS_NUM_THREADS), and no change to
process-wide BLAS state, also when two threads drive two models at once.

Each thread-count case runs in a fresh process (numba fixes its thread pool
at start-up); a few training steps at shapes where the batch is split into
chunks (B = 16, 17: uneven) and the one-off products are split over cores
(PAR_MACS forced to 0), RNN and LSTM, plan off, the fused LSTM forward
forced, the register-tiled products forced and (with MKL) MKL forced."""
import ctypes
import glob
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastrnn as fr

try:
    from fastrnn.backends import _mkl
    from fastrnn.backends import numba_cpu as nb
except Exception as e:  # numba missing: nothing of this file applies
    pytest.skip(f"numba backend not importable: {e}", allow_module_level=True)

CHILD = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    import fastrnn as fr
    from fastrnn.backends import numba_cpu as nb
    nb.PAR_MACS = 0                       # every one-off product split
    force = {force!r}
    if force == "mkl":
        nb.set_gemm("mkl")
        nb.MKL_FORCE = nb.MK_FWD | nb.MK_BWD
    elif force == "fused":
        nb.MKL_FORCE = nb.MK_FUSED
    elif force == "tiled":
        nb.MKL_FORCE = nb.MK_TILE
    out = {{}}
    for cell, B, H, L, bidir in (("rnn", 16, 12, 1, False),
                                 ("lstm", 17, 8, 2, True),
                                 ("lstm", 1, 70, 1, False),
                                 ("gru", 13, 8, 2, True)):
        Cell = {{"lstm": fr.LSTM, "gru": fr.GRU}}.get(cell, fr.RNN)
        core = Cell(5, H, num_layers=L, bidirectional=bidir, seed=1,
                    backend="numba", dtype=np.float32)
        model = fr.SequenceModel(core, 3)
        step = fr.TrainStep(model, fr.Adam(0.01))
        rng = np.random.default_rng(2)
        for _ in range(3):
            x = rng.standard_normal((9, B, 5)).astype(np.float32)
            y = rng.integers(0, 3, (9, B))
            step(x, y)
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(np.ascontiguousarray(v).tobytes())
        flow = fr.gradient_flow(model, x, y)
        h.update(np.asarray(flow).tobytes())
        out[f"{{cell}} B={{B}}"] = h.hexdigest()
    print(json.dumps(out))
""")


def _run(force, **env_extra):
    env = dict(os.environ)
    for k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        env.pop(k, None)
    env.update(env_extra)
    env["FASTRNN_PLAN"] = "off"
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(fr.__file__)))]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, "-c", CHILD.format(force=force)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"child failed:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("force", ["", "mkl", "fused", "tiled"],
                         ids=["loops", "mkl", "fused", "tiled"])
def test_bitwise_equal_for_any_thread_count(force):
    if force == "mkl" and not _mkl.status()[0]:
        pytest.skip(f"MKL unavailable: {_mkl.status()[1]}")
    base = _run(force, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for env in ({"NUMBA_NUM_THREADS": "2"},
                {"NUMBA_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "2"}):
        got = _run(force, **env)
        assert got == base, (env, got, base)


def _openblas():
    """SciPy's OpenBLAS (the library numba's np.dot would call) with its
    thread-count functions, or None."""
    import scipy
    libdir = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)),
                          "scipy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))):
        if "64_" in os.path.basename(path):
            continue
        lib = ctypes.CDLL(path)
        lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
        lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
        return lib
    return None


def test_two_models_in_two_threads_leave_blas_threads_alone():
    """Two threads each train their own model (batch split over chunks and
    B = 1): OpenBLAS's thread count is what it was before, every time, and
    both models reach the parameters of a sequential run."""
    lib = _openblas()
    if lib is None:
        pytest.skip("SciPy's OpenBLAS not found")
    before = lib.scipy_openblas_get_num_threads()
    target = 3 if before != 3 else 2          # a value we can recognise
    lib.scipy_openblas_set_num_threads(target)
    try:
        def make(B, seed):
            core = fr.LSTM(4, 16, seed=seed, backend="numba", dtype=np.float32)
            model = fr.SequenceModel(core, 3)
            rng = np.random.default_rng(seed)
            data = [(rng.standard_normal((6, B, 4)).astype(np.float32),
                     rng.integers(0, 3, (6, B))) for _ in range(20)]
            return model, fr.TrainStep(model, fr.SGD(0.05)), data

        def train(step, data):
            for x, y in data:
                step(x, y)

        seq = []
        for B, seed in ((16, 0), (1, 1)):
            m, s, data = make(B, seed)
            train(s, data)
            seq.append(m.state_dict())
        runs = [make(16, 0), make(1, 1)]
        ths = [threading.Thread(target=train, args=(s, d)) for _, s, d in runs]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        assert lib.scipy_openblas_get_num_threads() == target
        for (m, _, _), ref in zip(runs, seq):
            for k, v in ref.items():
                np.testing.assert_array_equal(m.state_dict()[k], v, err_msg=k)
    finally:
        lib.scipy_openblas_set_num_threads(before)


def test_kernels_call_no_external_blas():
    """No kernel calls numba's np.dot (SciPy's BLAS, whose thread count is
    process-wide and changes the bits): every product is fastrnn's own
    loops or MKL through its thread-local setting."""
    import inspect
    src = inspect.getsource(nb)
    assert "np.dot(" not in src and "np.matmul(" not in src
