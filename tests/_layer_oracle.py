"""A layer on a fast backend against the same layer on the NumPy reference:
forward, final state, input/state/parameter gradients. Shared by the
backend-specific test files (test_cuda.py, test_mkl.py)."""
import numpy as np

import fastrnn as fr
from conftest import assert_close


def make_layer(mode, I, H, L, bidir, dtype, backend, seed=0, bias=True):
    kw = dict(num_layers=L, bidirectional=bidir, dtype=dtype, seed=seed,
              backend=backend, bias=bias)
    if mode == "lstm":
        return fr.LSTM(I, H, **kw)
    if mode == "gru":
        return fr.GRU(I, H, **kw)
    return fr.RNN(I, H, nonlinearity=mode, **kw)


def flat_state(s):
    """A state (or a pair (h, c)) as one flat array."""
    return np.concatenate([np.ravel(a) for a in s]) if isinstance(s, tuple) else np.ravel(s)


def compare_layer(backend, mode, dtype=np.float64, tokens=False, T=5, B=3, I=3, H=5,
                  L=2, bidir=True, bias=True, seed=0, data_seed=None, state_clip=None,
                  after_forward=None):
    """Random inputs (lengths with a full-length row, h0/c0, output and state
    gradients) from data_seed (default: seed); layers seeded with seed.
    after_forward(layer) runs after the fast layer's forward."""
    rng = np.random.default_rng(seed if data_seed is None else data_seed)
    a = make_layer(mode, I, H, L, bidir, dtype, "numpy", seed, bias)
    b = make_layer(mode, I, H, L, bidir, dtype, backend, seed, bias)
    D = 2 if bidir else 1
    x = rng.integers(0, I, (T, B)) if tokens else rng.standard_normal((T, B, I))
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    h0 = rng.standard_normal((L * D, B, H)) * 0.5
    hx = (h0, rng.standard_normal(h0.shape) * 0.5) if mode == "lstm" else h0
    oa, ha = a(x, hx, lengths=lengths)
    ob, hb = b(x, hx, lengths=lengths)
    if after_forward is not None:
        after_forward(b)
    go = rng.standard_normal(oa.shape)
    gh = rng.standard_normal(h0.shape)
    ghn = (gh, rng.standard_normal(gh.shape)) if mode == "lstm" else gh
    dxa, dha = a.backward(go, ghn, state_clip=state_clip)
    dxb, dhb = b.backward(go, ghn, state_clip=state_clip)
    assert_close(ob, oa, dtype, "out")
    assert_close(flat_state(hb), flat_state(ha), dtype, "h_n")
    if not tokens:
        assert_close(dxb, dxa, dtype, "grad_x")
    assert_close(flat_state(dhb), flat_state(dha), dtype, "grad_hx")
    for k in a.grads:
        assert_close(b.grads[k], a.grads[k], dtype, k)
