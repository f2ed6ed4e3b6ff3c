"""A layer on a fast backend against the same layer on the NumPy reference:
forward, final state, input/state/parameter gradients; and a short training
run to compare the same way. Shared by the backend test files
(test_backends.py, test_cuda.py, test_mkl.py)."""
import numpy as np

import fastrnn as fr
from conftest import assert_close


def make_layer(mode, I, H, L, bidir, dtype, backend, seed=0, bias=True,
               batch_first=False):
    """An fr.LSTM (mode "lstm"), fr.GRU ("gru") or fr.RNN with nonlinearity
    ``mode``."""
    kw = dict(num_layers=L, bidirectional=bidir, dtype=dtype, seed=seed,
              backend=backend, bias=bias, batch_first=batch_first)
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
                  after_forward=None, lengths="random", batch_first=False):
    """Random inputs (h0/c0, output and state gradients; unless given,
    lengths with a full-length row) from data_seed (default: seed); layers
    seeded with seed. ``lengths``: "random", None (all of length T) or the
    array. after_forward(layer) runs after the fast layer's forward."""
    rng = np.random.default_rng(seed if data_seed is None else data_seed)
    a = make_layer(mode, I, H, L, bidir, dtype, "numpy", seed, bias, batch_first)
    b = make_layer(mode, I, H, L, bidir, dtype, backend, seed, bias, batch_first)
    D = 2 if bidir else 1
    shape = (B, T) if batch_first else (T, B)
    x = rng.integers(0, I, shape) if tokens else rng.standard_normal(shape + (I,))
    if isinstance(lengths, str) and lengths == "random":
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
    if tokens:
        assert dxa is None and dxb is None, "grad_x of token ids"
    else:
        assert_close(dxb, dxa, dtype, "grad_x")
    assert_close(flat_state(dhb), flat_state(dha), dtype, "grad_hx")
    assert set(a.grads) == set(b.grads) == set(a.state_dict()), "grads keys"
    for k in a.grads:
        assert_close(b.grads[k], a.grads[k], dtype, k)


def train_run(model, step, rng, *, T, B, lengths, tokens=False, steps=3):
    """``steps`` calls of the TrainStep ``step`` on random batches (token ids
    or floats; class ids or values as the model's loss and read-out want),
    the final state carried from step to step; then the gradient flow and
    the outputs on the last batch. Returns (results, flow, outputs)."""
    I, O = model.core.input_size, model.output_size
    res, hx = [], None
    for _ in range(steps):
        x = rng.integers(0, I, (T, B)) if tokens else rng.standard_normal((T, B, I))
        shape = (T, B) if model.readout == "all" else (B,)
        y = (rng.integers(0, O, shape) if model.loss == "cross_entropy"
             else rng.standard_normal(shape + (O,)))
        r = step(x, y, hx=hx, lengths=lengths)
        hx = r.hx
        res.append(r)
    flow = fr.gradient_flow(model, x, y, lengths=lengths)
    z, _ = model(x, lengths=lengths)
    return res, flow, z
