"""What is specific to the C backend: the extension is built where a
compiler exists, its kernels propagate NaN/inf as NumPy does, both ways of
running the time loop (explicit loops in C, or BLAS per step) agree with
the reference on the tile edges of the C product, and user-supplied indices
are bounds-checked before any C code indexes with them. Everything else is
covered for every backend by the shared suite (the `backend` fixture)."""
import os
import shutil
import sysconfig

import numpy as np
import pytest

import fastrnn as fr
from conftest import assert_close, short_reason

C_OK, C_WHY = fr.available_backends()["c"]
needs_c = pytest.mark.skipif(not C_OK, reason=f"backend 'c' unavailable: {short_reason(C_WHY)}")


def _compiler_present():
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    return shutil.which(cc) is not None and os.path.exists(header)


@pytest.mark.skipif(not _compiler_present(),
                    reason="no C compiler / Python headers: the extension is optional")
def test_extension_is_built_where_a_compiler_exists():
    assert C_OK, f"a C compiler exists but the C backend is unavailable: {C_WHY}"
    from fastrnn import _cfused
    assert hasattr(_cfused.lib, "fr_forward_f32")


# --------------------------------------------------------------------------
# the kernels themselves
# --------------------------------------------------------------------------
def _ref_act(mode, a):
    with np.errstate(all="ignore"):
        if mode == 0:
            return np.tanh(a)
        if mode == 1:
            return np.maximum(a, 0)
        return 1 / (1 + np.exp(-a))


def _activate(mode, a):
    from fastrnn import _cfused
    ffi, lib = _cfused.ffi, _cfused.lib
    a = np.ascontiguousarray(a).copy()
    f = lib.fr_activate_f32 if a.dtype == np.float32 else lib.fr_activate_f64
    ct = "float[]" if a.dtype == np.float32 else "double[]"
    f(mode, a.size, ffi.from_buffer(ct, a))
    return a


SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0,
           88.0, -88.0, 100.0, -100.0, 1e30, -1e30]


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["tanh", "relu", "sigmoid"])
def test_activations_propagate_nan_and_inf_like_numpy(mode, dtype):
    # long enough for the vectorised loops, NaN in every lane position
    a = np.array(SPECIAL * 5, dtype=dtype)
    got, ref = _activate(mode, a), _ref_act(mode, a)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    fin = ~np.isnan(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-6, atol=1e-30)


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", [0, 2], ids=["tanh", "sigmoid"])
def test_activation_accuracy(mode, dtype):
    x = np.linspace(-30, 30, 200001).astype(dtype)
    got = _activate(mode, x).astype(np.float64)
    ref = _ref_act(mode, x.astype(np.float64))
    # float32: a few ulps (the vectorised exponential); float64: libm
    tol = 1e-6 if dtype == np.float32 else 1e-14
    assert np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-30)
                  * (np.abs(ref) > 1e-30)) < tol


@needs_c
@pytest.mark.parametrize("mode", ["tanh", "relu", "sigmoid", "lstm", "gru"])
def test_nan_in_input_propagates_like_the_reference(mode):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 3)).astype(np.float32)
    x[2, 1, 0] = np.nan
    x[3, 2, 1] = np.inf
    out = {}
    for be in ("numpy", "c"):
        layer = _layer(mode, 3, 4, be, np.float32, seed=1)
        with np.errstate(all="ignore"):
            o, _ = layer(x)
        out[be] = o
    np.testing.assert_array_equal(np.isnan(out["c"]), np.isnan(out["numpy"]))
    fin = np.isfinite(out["numpy"])
    assert_close(out["c"][fin], out["numpy"][fin], np.float32)


# --------------------------------------------------------------------------
# both time-loop strategies, on the edges of the C product's tiles
# --------------------------------------------------------------------------
def _layer(mode, I, H, backend, dtype, seed=3, **kw):
    if mode == "lstm":
        return fr.LSTM(I, H, dtype=dtype, seed=seed, backend=backend, **kw)
    if mode == "gru":
        return fr.GRU(I, H, dtype=dtype, seed=seed, backend=backend, **kw)
    return fr.RNN(I, H, nonlinearity=mode, dtype=dtype, seed=seed, backend=backend, **kw)


@needs_c
@pytest.mark.parametrize("small_macs", [1 << 62, 0], ids=["c-loop", "blas-per-step"])
@pytest.mark.parametrize("mode", ["tanh", "relu", "sigmoid", "lstm", "gru"])
@pytest.mark.parametrize("B,H", [(1, 21), (6, 21), (4, 16), (9, 3)])
def test_time_loop_strategies_match_reference(monkeypatch, small_macs, mode, B, H):
    import fastrnn.backends.c as cb
    monkeypatch.setattr(cb, "SMALL_MACS", small_macs)
    T, I = 7, 5
    rng = np.random.default_rng(B * 100 + H)
    lengths = rng.integers(1, T + 1, B)
    a = _layer(mode, I, H, "numpy", np.float64, num_layers=2, bidirectional=True)
    b = _layer(mode, I, H, "c", np.float64, num_layers=2, bidirectional=True)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((4, B, H))
    hx = (h0, rng.standard_normal(h0.shape)) if mode == "lstm" else h0
    oa, _ = a(x, hx, lengths=lengths)
    ob, _ = b(x, hx, lengths=lengths)
    assert_close(ob, oa, np.float64, "out")
    go = rng.standard_normal(oa.shape)
    dxa, _ = a.backward(go, state_clip=0.5)
    dxb, _ = b.backward(go, state_clip=0.5)
    assert_close(dxb, dxa, np.float64, "grad_x")
    for k in a.grads:
        assert_close(b.grads[k], a.grads[k], np.float64, k)


# --------------------------------------------------------------------------
# indices: checked before C indexes with them
# --------------------------------------------------------------------------
@needs_c
def test_backend_rejects_out_of_range_token_ids_itself():
    """The layers validate ids; the backend checks again, so a caller that
    bypasses the layer still never reaches C with a bad id."""
    import fastrnn.backends.c as cb
    layer = fr.RNN(4, 3, backend="c")
    st0 = np.zeros((1, 1, 2, 3), np.float32)
    for bad in (4, -1):
        x = np.array([[0, 1], [2, bad]])
        with pytest.raises(ValueError, match="token ids"):
            cb.core_forward(layer._spec, layer._flat, x, np.array([2, 2]), st0)


@needs_c
def test_c_helpers_skip_out_of_range_indices():
    from fastrnn import _cfused
    ffi, lib = _cfused.ffi, _cfused.lib
    src = np.arange(12, dtype=np.float64).reshape(4, 3)
    dst = np.zeros((2, 3))
    idx = np.array([0, 5, -1, 1])
    bad = lib.fr_scatter_add_f64(4, 3, ffi.from_buffer("int64_t[]", idx),
                                 ffi.from_buffer("double[]", src), 2,
                                 ffi.from_buffer("double[]", dst))
    assert bad == 2
    np.testing.assert_array_equal(dst, [src[0], src[3]])
    # class ids of the cross-entropy loss
    la = ffi.new("fr_loss_args *")
    la.R, la.O, la.B, la.kind, la.all_valid = 2, 3, 2, 0, 1
    z = np.zeros((2, 3))
    dz = np.full((2, 3), 7.0)
    y = np.array([1, 3])
    lib.fr_loss_f64(la, ffi.from_buffer("double[]", z), ffi.from_buffer("int64_t[]", y),
                    ffi.NULL, ffi.from_buffer("double[]", dz))
    assert la.bad == 1
    np.testing.assert_array_equal(dz[1], 0)
