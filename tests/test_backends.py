"""Every fast backend against the NumPy reference on identical weights, over
a grid of options, float64 (1e-9 relative) and float32 (1e-4)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastrnn as fr
from _layer_oracle import compare_layer, flat_state, make_layer, train_run
from conftest import assert_close
from fastrnn import backends

MODES = ["tanh", "relu", "sigmoid", "lstm", "gru"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("L,bidir", [(1, False), (2, True)])
def test_layer_matches_reference(fast_backend, mode, dtype, L, bidir):
    lengths = np.array([5, 2, 4])
    compare_layer(fast_backend, mode, dtype, T=5, B=3, I=4, H=6, L=L, bidir=bidir,
                  lengths=lengths)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [
    dict(T=1, B=1, I=1, H=1, L=1, bidir=False),      # the smallest everything
    dict(T=1, B=3, I=2, H=1, L=2, bidir=True),       # T=1, H=1
    dict(T=7, B=1, I=3, H=4, L=1, bidir=True),       # B=1
    dict(T=3, B=2, I=2, H=40, L=1, bidir=False),     # BLAS path for the step product
])
def test_edge_shapes(fast_backend, mode, case):
    compare_layer(fast_backend, mode, np.float64, lengths=None, seed=1, **case)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(MODES), T=st.integers(1, 6), B=st.integers(1, 4),
       I=st.integers(1, 4), H=st.integers(1, 6), L=st.integers(1, 2),
       bidir=st.booleans(), bias=st.booleans(), tokens=st.booleans(),
       batch_first=st.booleans(), use_lengths=st.booleans(),
       dtype=st.sampled_from([np.float64, np.float32]), seed=st.integers(0, 2**16))
def test_layer_grid(fast_backend, mode, T, B, I, H, L, bidir, bias, tokens, batch_first,
                    use_lengths, dtype, seed):
    assume(backends.supports(fast_backend, mode))
    lengths = np.random.default_rng(seed).integers(1, T + 1, B) if use_lengths else None
    compare_layer(fast_backend, mode, dtype, tokens, T=T, B=B, I=I, H=H, L=L,
                  bidir=bidir, bias=bias, seed=seed, lengths=lengths,
                  batch_first=batch_first)


def _train(backend, mode, loss, readout, opt, clip, state_clip, dtype, tokens, bidir,
           steps=3, seed=0):
    T, B, I, H, O = 5, 3, 4, 5, 3
    core = make_layer(mode, I, H, 2 if bidir else 1, bidir, dtype, backend, seed=seed)
    model = fr.SequenceModel(core, O, loss=loss, readout=readout)
    step = fr.TrainStep(model, opt, clip=clip, state_clip=state_clip)
    out, flow, z = train_run(model, step, np.random.default_rng(seed), T=T, B=B,
                             lengths=np.array([5, 2, 4]), tokens=tokens, steps=steps)
    return out, model.state_dict(), flow, z, step


OPTS = [lambda: fr.SGD(0.1), lambda: fr.SGD(0.05, momentum=0.9), lambda: fr.Adam(0.01),
        lambda: fr.Adagrad(0.1)]
CLIPS = [lambda: None, lambda: fr.ClipNorm(0.3), lambda: fr.ClipValue(0.02)]


@pytest.mark.parametrize("mode", ["tanh", "lstm", "gru"])
@pytest.mark.parametrize("opt", range(len(OPTS)))
@pytest.mark.parametrize("clip", range(len(CLIPS)))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_train_step_matches_reference(fast_backend, mode, opt, clip, dtype):
    args = (mode, "cross_entropy", "all", OPTS[opt](), CLIPS[clip](), None, dtype,
            False, True)
    ra, pa, fa, za, _ = _train("numpy", *args)
    rb, pb, fb, zb, _ = _train(fast_backend, *args)
    for a, b in zip(ra, rb):
        assert_close(b.loss, a.loss, dtype, "loss")
        assert_close(b.grad_norm, a.grad_norm, dtype, "grad_norm")
        assert a.clipped == b.clipped and a.skipped == b.skipped
        assert_close(flat_state(b.hx), flat_state(a.hx), dtype, "hx")
    if CLIPS[clip]() is not None:
        assert any(a.clipped for a in ra), "test should exercise clipping"
    for k in pa:
        assert_close(pb[k], pa[k], dtype, k)
    assert_close(fb, fa, dtype, "gradient_flow")
    assert_close(zb, za, dtype, "model outputs")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("readout", ["all", "last"])
@pytest.mark.parametrize("tokens", [False, True])
def test_train_options_match_reference(fast_backend, mode, loss, readout, tokens):
    args = (mode, loss, readout, fr.Adam(0.01), fr.ClipNorm(1.0), 0.05, np.float64,
            tokens, True)
    ra, pa, fa, za, _ = _train("numpy", *args)
    rb, pb, fb, zb, _ = _train(fast_backend, *args)
    for a, b in zip(ra, rb):
        assert_close(b.loss, a.loss, np.float64, "loss")
        assert_close(b.grad_norm, a.grad_norm, np.float64, "grad_norm")
    for k in pa:
        assert_close(pb[k], pa[k], np.float64, k)
    assert_close(fb, fa, np.float64, "gradient_flow")
    assert_close(zb, za, np.float64, "model outputs")


@pytest.mark.parametrize("mode", ["tanh", "lstm", "gru"])
def test_products_split_over_cores(fast_backend, mode, monkeypatch):
    """The numba backend splits the input projection, the weight gradients
    (partial sums), the input gradient of a bidirectional layer and the
    read-out over the cores above a size threshold: force the threshold to 0
    so every split path runs at test size, with uneven batch chunks (B=5)."""
    if fast_backend == "numba":
        from fastrnn.backends import numba_cpu
        monkeypatch.setattr(numba_cpu, "PAR_MACS", 0)
    compare_layer(fast_backend, mode, np.float64, T=12, B=5, I=70, H=48, L=2,
                  bidir=True, seed=3, lengths=np.array([12, 7, 12, 1, 9]))
    args = (mode, "cross_entropy", "all", fr.Adam(0.01), fr.ClipNorm(1.0), None,
            np.float64, False, True)
    ra, pa, *_ = _train("numpy", *args, steps=1)
    rb, pb, *_ = _train(fast_backend, *args, steps=1)
    assert_close(rb[0].loss, ra[0].loss, np.float64, "loss")
    for k in pa:
        assert_close(pb[k], pa[k], np.float64, k)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_propagate_like_the_reference(fast_backend, mode, dtype):
    """NaN/inf in the input propagate as in NumPy (the vectorised float32
    activations must not clamp a NaN into a number, ReLU must not zero it)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 3))
    x[2, 1, 0] = np.nan
    x[3, 2, 1] = np.inf
    x[1, 0, 2] = -np.inf
    out = {}
    for be in ("numpy", fast_backend):
        layer = make_layer(mode, 3, 4, 1, False, dtype, be, seed=1)
        with np.errstate(all="ignore"):
            out[be], _ = layer(x)
    np.testing.assert_array_equal(np.isnan(out[fast_backend]), np.isnan(out["numpy"]))
    assert np.isnan(out["numpy"]).any()
    fin = np.isfinite(out["numpy"])
    assert_close(out[fast_backend][fin], out["numpy"][fin], dtype)
