"""The top layer's cell states (top_cells) and the optional dL/dc_t input of
core_backward (dcs) that fastrnn.torch's return_cell_states rests on: the
reference against float64 central finite differences, every other backend
against the reference."""
import numpy as np
import pytest

from fastrnn import backends
from fastrnn._spec import make_spec
from fastrnn.backends import reference as ref

from conftest import assert_close

EPS = 1e-6


def _setup(L, D, T=4, B=3, I=3, H=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    spec = make_spec("lstm", I, H, L, D, True)
    flat = rng.uniform(-0.8, 0.8, spec._n_total).astype(dtype)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state0 = (rng.standard_normal((2, L * D, B, H)) * 0.5).astype(dtype)
    lengths = np.array([T, 2, 1][:B], dtype=np.int64)
    return spec, flat, x, state0, lengths, rng


def _fd(f, arr):
    g = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
        old = arr[i]
        arr[i] = old + EPS
        fp = f()
        arr[i] = old - EPS
        fm = f()
        arr[i] = old
        g[i] = (fp - fm) / (2 * EPS)
    return g


def _out_and_cells(spec, flat, x, state0, lengths):
    """The reference output and the top layer's cell states."""
    out, _, cache = ref.core_forward(spec, flat, x, lengths, state0)
    return out, ref.top_cells(spec, cache)


@pytest.mark.parametrize("L,D", [(1, 1), (2, 2)])
def test_reference_dcs_against_finite_differences(L, D):
    spec, flat, x, state0, lengths, rng = _setup(L, D)
    out, cs = _out_and_cells(spec, flat, x, state0, lengths)
    Gout = rng.standard_normal(out.shape)
    Gcs = rng.standard_normal(cs.shape)

    def loss():
        o, c = _out_and_cells(spec, flat, x, state0, lengths)
        return float(np.sum(o * Gout) + np.sum(c * Gcs))

    _, _, cache = ref.core_forward(spec, flat, x, lengths, state0)
    dx, dst0, grad, _ = ref.core_backward(spec, flat, cache, Gout,
                                          np.zeros_like(state0), dcs=Gcs)
    for name, a, n in (("flat", grad, _fd(loss, flat)), ("x", dx, _fd(loss, x)),
                       ("state0", dst0, _fd(loss, state0))):
        scale = max(1.0, float(np.abs(n).max()))
        assert float(np.abs(a - n).max()) / scale < 1e-6, name


def test_reference_cells_match_state():
    """The last valid cell state of each sequence is c_n (forward direction),
    and padding steps hold zeros."""
    spec, flat, x, state0, lengths, _ = _setup(1, 1)
    _, st, cache = ref.core_forward(spec, flat, x, lengths, state0)
    cs = ref.top_cells(spec, cache)
    for b, n in enumerate(lengths):
        assert_close(cs[n - 1, b], st[1, 0, b])
        assert not cs[n:, b].any()


@pytest.mark.parametrize("L,D", [(1, 1), (2, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_backends_match_reference(fast_backend, L, D, dtype):
    be = backends.get(fast_backend)
    spec, flat, x, state0, lengths, rng = _setup(L, D, dtype=dtype)
    Gout = rng.standard_normal((x.shape[0], x.shape[1], D * spec.H)).astype(dtype)
    Gcs = rng.standard_normal(Gout.shape).astype(dtype)
    Gst = rng.standard_normal(state0.shape).astype(dtype)
    _, _, rc = ref.core_forward(spec, flat, x, lengths, state0)
    want = ref.core_backward(spec, flat, rc, Gout, Gst, dcs=Gcs)
    _, _, fc = be.core_forward(spec, flat, x, lengths, state0, ctx={})
    assert_close(be.top_cells(spec, fc), ref.top_cells(spec, rc), dtype)
    got = be.core_backward(spec, flat, fc, Gout, Gst, ctx={}, dcs=Gcs)
    for name, a, b in zip(("dx", "dstate0", "grad"), got[:3], want[:3]):
        assert_close(a, b, dtype, err_msg=name)
    # without dcs: unchanged behaviour
    base = ref.core_backward(spec, flat, rc, Gout, Gst)
    got = be.core_backward(spec, flat, fc, Gout, Gst, ctx={})
    assert_close(got[2], base[2], dtype, err_msg="grad without dcs")


@pytest.mark.parametrize("path", ["persistent", "step"])
def test_cuda_both_paths(path):
    """The cuda backend's two BPTT kernels (persistent, per-step) with dcs."""
    ok, why = backends.available_backends()["cuda"]
    if not ok:
        pytest.skip(f"backend 'cuda' unavailable: {why}")
    from fastrnn.backends import cuda as cb
    old = cb.configure(PATH=path)
    try:
        spec, flat, x, state0, lengths, rng = _setup(2, 2)
        Gout = rng.standard_normal((x.shape[0], x.shape[1], 2 * spec.H))
        Gcs = rng.standard_normal(Gout.shape)
        _, _, rc = ref.core_forward(spec, flat, x, lengths, state0)
        want = ref.core_backward(spec, flat, rc, Gout, np.zeros_like(state0),
                                 dcs=Gcs)
        _, _, fc = cb.core_forward(spec, flat, x, lengths, state0, ctx={})
        assert_close(cb.top_cells(spec, fc), ref.top_cells(spec, rc))
        got = cb.core_backward(spec, flat, fc, Gout, np.zeros_like(state0),
                               ctx={}, dcs=Gcs)
        for name, a, b in zip(("dx", "dstate0", "grad"), got[:3], want[:3]):
            assert_close(a, b, err_msg=name)
    finally:
        cb.configure(**old)
