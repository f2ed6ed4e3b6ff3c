"""The reference backend against float64 central finite differences: every
parameter, the input and the initial state; every cell mode (the GRU included), stacking,
bidirectionality, lengths, token ids, both losses and both readouts."""
import numpy as np
import pytest

from fastrnn._spec import make_spec
from fastrnn.backends import reference as ref

EPS = 1e-6
RTOL = 1e-6   # central differences in float64: truncation ~EPS^2, rounding ~1e-10/EPS


def _fd(f, arr, eps=EPS):
    """Central differences of scalar f() w.r.t. every element of arr (in place)."""
    g = np.zeros_like(arr)
    it = np.nditer(arr, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = arr[i]
        arr[i] = old + eps
        fp = f()
        arr[i] = old - eps
        fm = f()
        arr[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def _check(name, analytic, numeric):
    scale = max(1.0, float(np.abs(numeric).max()))
    err = float(np.abs(analytic - numeric).max()) / scale
    assert err < RTOL, f"{name}: max error {err:.2e} (scaled) vs finite differences"


def _setup(mode, L, D, bias=True, T=4, B=2, I=3, H=3, tokens=False, seed=0):
    rng = np.random.default_rng(seed)
    spec = make_spec(mode, I, H, L, D, bias)
    flat = rng.uniform(-0.8, 0.8, spec._n_total)
    x = rng.integers(0, I, (T, B)) if tokens else rng.standard_normal((T, B, I))
    S = spec.S
    state0 = rng.standard_normal((S, L * D, B, H)) * 0.5
    return spec, flat, x, state0, rng


CORE_CASES = [
    ("tanh", 1, 1), ("relu", 1, 1), ("sigmoid", 1, 1), ("lstm", 1, 1),
    ("tanh", 2, 2), ("relu", 2, 1), ("sigmoid", 1, 2), ("lstm", 2, 2),
    ("gru", 1, 1), ("gru", 2, 2),
]


@pytest.mark.parametrize("mode,L,D", CORE_CASES)
@pytest.mark.parametrize("use_lengths", [False, True])
def test_core_gradients(mode, L, D, use_lengths):
    spec, flat, x, state0, rng = _setup(mode, L, D)
    T, B = x.shape[:2]
    lengths = np.array([T, 2]) if use_lengths else np.full(B, T)
    out0, st0, _ = ref.core_forward(spec, flat, x, lengths, state0)
    Gout = rng.standard_normal(out0.shape)
    Gst = rng.standard_normal(st0.shape)

    def loss():
        out, st, _ = ref.core_forward(spec, flat, x, lengths, state0)
        return float(np.sum(out * Gout) + np.sum(st * Gst))

    _, _, cache = ref.core_forward(spec, flat, x, lengths, state0)
    dx, dstate0, grad, _ = ref.core_backward(spec, flat, cache, Gout, Gst)
    _check("params", grad, _fd(loss, flat))
    _check("x", dx, _fd(loss, x))
    _check("state0", dstate0, _fd(loss, state0))
    if use_lengths:  # padding produces zero output and receives no gradient
        assert np.all(out0[2:, 1] == 0)
        assert np.all(dx[2:, 1] == 0)


@pytest.mark.parametrize("mode", ["tanh", "lstm", "gru"])
def test_core_gradients_no_bias_tokens(mode):
    spec, flat, x, state0, rng = _setup(mode, 2, 2, bias=False, tokens=True)
    T, B = x.shape
    lengths = np.array([3, T])
    out0, st0, _ = ref.core_forward(spec, flat, x, lengths, state0)
    Gout = rng.standard_normal(out0.shape)

    def loss():
        return float(np.sum(ref.core_forward(spec, flat, x, lengths, state0)[0] * Gout))

    _, _, cache = ref.core_forward(spec, flat, x, lengths, state0)
    dx, dstate0, grad, _ = ref.core_backward(spec, flat, cache, Gout, np.zeros_like(st0))
    assert dx is None
    _check("params", grad, _fd(loss, flat))
    _check("state0", dstate0, _fd(loss, state0))


@pytest.mark.parametrize("loss_kind", ["cross_entropy", "mse"])
@pytest.mark.parametrize("readout", ["all", "last"])
@pytest.mark.parametrize("mode,D", [("tanh", 2), ("lstm", 1), ("gru", 2)])
def test_model_loss_gradient(loss_kind, readout, mode, D):
    """d(loss)/d(every parameter incl. read-out), loss = sum over steps,
    mean over batch; with lengths."""
    spec0, _, x, state0, rng = _setup(mode, 1, D, T=4, B=3)
    O = 3
    spec = spec0.with_readout(O, loss_kind, readout)
    flat = rng.uniform(-0.8, 0.8, spec._n_total)
    T, B = x.shape[:2]
    lengths = np.array([4, 1, 3])
    shape = (T, B) if readout == "all" else (B,)
    y = rng.integers(0, O, shape) if loss_kind == "cross_entropy" else rng.standard_normal(shape + (O,))

    def f():
        return ref.loss_and_grad(spec, flat, x, lengths, state0, y)[0]

    _, grad, _, _ = ref.loss_and_grad(spec, flat, x, lengths, state0, y)
    _check("params", grad, _fd(f, flat))


def test_loss_definition():
    """The loss is sum over valid steps of the per-step loss, mean over batch."""
    spec0, _, x, state0, rng = _setup("tanh", 1, 1, T=3, B=2)
    spec = spec0.with_readout(2, "cross_entropy", "all")
    flat = rng.uniform(-0.5, 0.5, spec._n_total)
    y = rng.integers(0, 2, (3, 2))
    lengths = np.array([3, 2])
    loss = ref.loss_and_grad(spec, flat, x, lengths, state0, y)[0]
    z, _ = ref.model_forward(spec, flat, x, lengths, state0)
    total = 0.0
    for b in range(2):
        for t in range(lengths[b]):
            p = np.exp(z[t, b]) / np.exp(z[t, b]).sum()
            total -= np.log(p[y[t, b]])
    assert abs(loss - total / 2) < 1e-12
