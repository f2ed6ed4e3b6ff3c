"""The numba backend with Intel MKL (the `mkl` extra) for its per-step
products: every MKL path against the NumPy reference on identical weights,
the FASTRNN_MKL switch, and numba's on-disk cache of the kernels that call
MKL through function addresses.

Skipped, with the reason, when MKL is not installed (`pip install -e
".[mkl]"`)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastrnn as fr
from _layer_oracle import compare_layer, make_layer as _layer
from conftest import assert_close, short_reason

try:
    from fastrnn.backends import _mkl
    from fastrnn.backends import numba_cpu as nb
except Exception as e:  # numba missing: nothing of this file applies
    pytest.skip(f"numba backend not importable: {e}", allow_module_level=True)

MKL_OK, MKL_WHY = _mkl.status()
MKL_SKIP = f"MKL unavailable: {short_reason(MKL_WHY)}"
needs_mkl = pytest.mark.skipif(not MKL_OK, reason=MKL_SKIP)

# packed (the default) and plain cblas_?gemm; forward and backward alone
PATHS = {
    "packed": nb.MK_FWD | nb.MK_BWD | nb.MK_PACKED,
    "gemm": nb.MK_FWD | nb.MK_BWD,
    "fwd-packed": nb.MK_FWD | nb.MK_PACKED,
    "bwd-gemm": nb.MK_BWD,
}


@pytest.fixture(params=list(PATHS))
def mkl_paths(request, monkeypatch):
    """The numba backend on MKL with the given paths forced at every shape
    (without forcing, the plan chooses: tests/test_plan.py)."""
    if not MKL_OK:
        pytest.skip(MKL_SKIP)
    monkeypatch.setattr(nb, "MKL_FORCE", PATHS[request.param])
    prev = nb.set_gemm("mkl")
    yield request.param
    nb.set_gemm(prev)


def _used_mkl(caller):
    """The MKL flags the numba backend put in cfg for the caller's (a layer,
    a TrainStep) last call."""
    return int(caller._ctx["numba"].cfg[nb.C_MKL])


@pytest.mark.parametrize("mode", ["tanh", "lstm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B", [1, 2, 5])
@pytest.mark.parametrize("L,bidir,tokens", [(1, False, False), (2, True, False),
                                            (2, True, True)])
def test_layer_matches_reference(mkl_paths, mode, dtype, B, L, bidir, tokens):
    """Forward, final state, input/state/parameter gradients: float32 1e-4,
    float64 1e-9 relative. B=5 gives chunks of 4 and 1 rows (different
    packing sizes); B=1 one chunk of one row."""
    def check_engine(b):
        assert _used_mkl(b) != 0

    compare_layer("numba", mode, dtype, tokens, T=6, B=B, I=4, H=7, L=L, bidir=bidir,
                  data_seed=B * 10 + L, after_forward=check_engine)


@pytest.mark.parametrize("mode", ["tanh", "lstm", "gru"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_train_step_adam_clipnorm_matches_reference(mkl_paths, mode, dtype):
    """Three fused steps (Adam, ClipNorm, lengths, carried state) on MKL
    against the reference: losses, gradient norms, parameters."""
    T, B, I, H, O = 7, 4, 3, 9, 5
    res = {}
    for backend in ("numpy", "numba"):
        core = _layer(mode, I, H, 2, True, dtype, backend, seed=3)
        model = fr.SequenceModel(core, O)
        step = fr.TrainStep(model, fr.Adam(0.02), clip=fr.ClipNorm(0.5))
        rng = np.random.default_rng(7)
        lengths = np.array([7, 3, 5, 1])
        hx, out = None, []
        for _ in range(3):
            x = rng.standard_normal((T, B, I))
            y = rng.integers(0, O, (T, B))
            r = step(x, y, hx=hx, lengths=lengths)
            hx = r.hx
            out.append(r)
        res[backend] = (out, model.state_dict())
        if backend == "numba":
            assert _used_mkl(step) & (nb.MK_FWD | nb.MK_BWD)
    (ra, pa), (rb, pb) = res["numpy"], res["numba"]
    for a, b in zip(ra, rb):
        assert_close(b.loss, a.loss, dtype, "loss")
        assert_close(b.grad_norm, a.grad_norm, dtype, "grad_norm")
        assert a.clipped == b.clipped
    for k in pa:
        assert_close(pb[k], pa[k], dtype, k)


@needs_mkl
def test_engine_is_reported_and_switchable():
    ok, why = fr.available_backends()["numba"]
    assert ok
    assert "gemm:" in why
    prev = nb.set_gemm("default")
    try:
        assert nb.gemm_engine() == "default"
        assert "built-in loops" in nb.available()[1]
        nb.set_gemm("mkl")
        assert nb.gemm_engine().startswith("mkl")
        assert "gemm: mkl" in nb.available()[1]
        with pytest.raises(ValueError, match="engine"):
            nb.set_gemm("openblas")
    finally:
        nb.set_gemm(prev)


def test_status_says_why_when_missing(monkeypatch):
    """An explicit FASTRNN_MKL_LIB that does not exist: unavailable, with the
    path and the install hint in the reason (runs with or without MKL)."""
    monkeypatch.setenv("FASTRNN_MKL_LIB", "/nonexistent/libmkl_rt.so.3")
    monkeypatch.setattr(_mkl, "_state", {})
    ok, why = _mkl.status()
    assert not ok
    assert "/nonexistent/libmkl_rt.so.3" in why and "pip install" in why
    with pytest.raises(_mkl.MklUnavailable):
        _mkl.load()


# ---------------------------------------------------------------------------
# FASTRNN_MKL in a fresh process, and numba's cache of the MKL kernels
# ---------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fastrnn as fr
    from fastrnn.backends import numba_cpu as nb
    nb.MKL_FORCE = nb.MK_FWD | nb.MK_BWD   # used only with the engine "mkl"
    out = {{"reason": fr.available_backends()["numba"][1],
           "engine": nb.gemm_engine()}}
    core = fr.LSTM(3, 8, seed=0, backend="numba")
    step = fr.TrainStep(fr.SequenceModel(core, 4), fr.SGD(0.1))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16, 3)).astype(np.float32)  # chunks of 4 rows
    y = rng.integers(0, 4, (5, 16))
    try:
        out["loss"] = step(x, y).loss
        out["mkl_flags"] = int(step._ctx["numba"].cfg[nb.C_MKL])
    except RuntimeError as e:
        out["error"] = str(e)
    out["cache_misses"] = sum(len(f.stats.cache_misses) for f in (
        nb.train_step_kernel, nb.core_forward_kernel, nb.core_backward_kernel,
        nb._forward_chunks, nb._backward_chunks))
    out["cache_hits"] = sum(len(f.stats.cache_hits) for f in (
        nb.train_step_kernel, nb._forward_chunks, nb._backward_chunks))
    if {torch}:
        import torch
        out["torch_threads"] = torch.get_num_threads()
    print(json.dumps(out))
""")


def _child(torch=False, **env_extra):
    """Run CHILD in a fresh interpreter with these environment variables
    (FASTRNN_MKL, FASTRNN_MKL_LIB and MKL_VERBOSE only when given); torch:
    import torch after the training step and report its thread count."""
    env = dict(os.environ)
    for k in ("FASTRNN_MKL", "FASTRNN_MKL_LIB", "MKL_VERBOSE"):
        env.pop(k, None)
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(fr.__file__)))]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, "-c", CHILD.format(torch=torch)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"child failed:\n{r.stdout}\n{r.stderr}"
    lines = r.stdout.strip().splitlines()
    return json.loads(lines[-1]), r.stdout


@needs_mkl
def test_env_auto_uses_mkl_and_kernels_load_from_cache():
    """Unset FASTRNN_MKL: MKL is used (MKL_VERBOSE shows its sgemm calls),
    and a second process loads every kernel from numba's cache (the MKL
    addresses are arguments, not globals baked into the code)."""
    _child()                                   # fills the cache if stale
    out, stdout = _child(MKL_VERBOSE="1")
    assert out["engine"].startswith("mkl"), out
    assert out["mkl_flags"] & (nb.MK_FWD | nb.MK_BWD), out
    assert "SGEMM(" in stdout, stdout[-2000:]
    assert out["cache_misses"] == 0 and out["cache_hits"] > 0, out


@needs_mkl
def test_env_zero_disables_mkl():
    out, stdout = _child(FASTRNN_MKL="0", MKL_VERBOSE="1")
    assert out["engine"] == "default" and out["mkl_flags"] == 0, out
    assert "FASTRNN_MKL=0" in out["reason"]
    assert "GEMM" not in stdout
    assert np.isfinite(out["loss"])


@needs_mkl
def test_env_one_uses_mkl():
    out, _ = _child(FASTRNN_MKL="1")
    assert out["mkl_flags"] & (nb.MK_FWD | nb.MK_BWD), out
    assert np.isfinite(out["loss"])


@needs_mkl
def test_torch_imported_later_keeps_its_threads():
    """MKL's libraries export their symbols globally, and PyTorch's CPU
    wheel then calls this MKL; it sets its thread count from
    mkl_get_max_threads(). _mkl uses MKL's TBB layer so that a torch imported
    after a training step still gets as many threads as without fastrnn
    (with the SEQUENTIAL layer it got 1 and ran ~2x slower)."""
    pytest.importorskip("torch")
    without, _ = _child(FASTRNN_MKL="0", torch=True)
    with_mkl, _ = _child(torch=True)
    assert with_mkl["mkl_flags"], with_mkl
    assert with_mkl["torch_threads"] == without["torch_threads"], (with_mkl, without)


def test_env_one_without_mkl_raises_at_first_use():
    """FASTRNN_MKL=1 with MKL missing (simulated by a library path that does
    not exist): importing and listing backends work, the first kernel call
    raises a RuntimeError that says why."""
    out, _ = _child(FASTRNN_MKL="1", FASTRNN_MKL_LIB="/nonexistent/libmkl_rt.so.3")
    assert "FASTRNN_MKL=1" in out["reason"]
    assert "error" in out, out
    assert "FASTRNN_MKL=1" in out["error"] and "not installed" in out["error"]
