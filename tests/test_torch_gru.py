"""PyTorch as the oracle for fr.GRU, fr.GRUCell, and fr.SequenceModel /
fr.TrainStep / fr.gradient_flow with a GRU core.

Every test runs on every backend that implements the GRU (``gru_backend``:
the NumPy reference, the C backend, and any other once it has the cell) and
compares fastrnn with torch on identical weights (torch's state_dict loaded
as is): ``torch.nn.GRU`` (plain and packed sequences, one-hot input for
token ids) and ``torch.nn.GRUCell``. Float64 is held to 1e-9 relative and
float32 to 1e-4 (conftest's table). Shapes are tiny: T <= 6, B <= 3, H <= 5.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastrnn as fr  # noqa: E402
from fastrnn import backends  # noqa: E402
from conftest import assert_close  # noqa: E402

from _torch_oracle import (F64, TORCH_DTYPE, TorchModel, _check_param_grads,  # noqa: E402
                           _np, _t, train_and_compare)

GRU_BACKENDS = [b for b in backends.NAMES if backends.supports(b, "gru")]


@pytest.fixture(params=GRU_BACKENDS)
def gru_backend(request):
    """Every backend with the GRU cell; skips (with the reason) when the
    backend is not available on this machine."""
    ok, why = fr.available_backends()[request.param]
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable: {why}")
    return request.param


def _torch_gru(I, H, num_layers=1, bias=True, bidirectional=False, dtype=F64,
               seed=0):
    torch.manual_seed(seed)
    m = torch.nn.GRU(I, H, num_layers=num_layers, bias=bias,
                     bidirectional=bidirectional)
    return m.to(TORCH_DTYPE[np.dtype(dtype)])


def _fr_like(tm, dtype, backend, batch_first=False):
    layer = fr.GRU(tm.input_size, tm.hidden_size, tm.num_layers, tm.bias,
                   batch_first, 0.0, tm.bidirectional, dtype=dtype,
                   backend=backend)
    layer.load_state_dict(tm.state_dict())
    sd = layer.state_dict()
    ref = {k: _np(v) for k, v in tm.state_dict().items()}
    assert list(sd) == list(ref), "state_dict keys/order differ from torch's"
    for k in ref:
        assert_close(sd[k], ref[k], dtype, f"loaded {k}")
    return layer


# --------------------------------------------------------------------------
# 1. fr.GRU vs nn.GRU: outputs and every gradient
# --------------------------------------------------------------------------
# (num_layers, bidirectional, batch_first, with_hx, bias)
GRU_CASES = [
    (1, False, False, False, True),
    (1, True, True, True, False),
    (2, False, True, True, True),
    (2, True, False, False, True),
    (3, True, True, True, False),
    (3, False, False, True, True),
]


def _compare(backend, dtype, num_layers, bidirectional, batch_first, with_hx,
             bias, T=5, B=3, I=4, H=5):
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(3)
    tm = _torch_gru(I, H, num_layers, bias, bidirectional, dtype, seed=1)
    layer = _fr_like(tm, dtype, backend, batch_first)
    sshape = (D * num_layers, B, H)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.standard_normal(sshape).astype(dtype) if with_hx else None
    xl = np.swapaxes(x, 0, 1).copy() if batch_first else x
    layer(rng.standard_normal(xl.shape).astype(dtype))   # a decoy call first
    out, hn = layer(xl, h0)
    if batch_first:
        out = np.swapaxes(out, 0, 1)
    xt = _t(x, grad=True)
    h0t = _t(h0 if with_hx else np.zeros(sshape, dtype), grad=True)
    out_t, hn_t = tm(xt, h0t)
    assert out.dtype == hn.dtype == np.dtype(dtype)
    assert_close(out, _np(out_t), dtype, "out")
    assert_close(hn, _np(hn_t), dtype, "h_n")

    g_out = rng.standard_normal(out.shape).astype(dtype)
    g_hn = rng.standard_normal(sshape).astype(dtype)
    g_l = np.swapaxes(g_out, 0, 1).copy() if batch_first else g_out
    grad_x, grad_h0 = layer.backward(g_l, g_hn)
    if batch_first:
        grad_x = np.swapaxes(grad_x, 0, 1)
    torch.autograd.backward([out_t, hn_t], [_t(g_out), _t(g_hn)])
    assert_close(grad_x, _np(xt.grad), dtype, "grad_x")
    assert_close(grad_h0, _np(h0t.grad), dtype, "grad_h0")
    _check_param_grads(layer, tm, dtype)


@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first,with_hx,bias", GRU_CASES)
def test_gru_matches_torch_float64(gru_backend, num_layers, bidirectional,
                                   batch_first, with_hx, bias):
    _compare(gru_backend, F64, num_layers, bidirectional, batch_first,
             with_hx, bias)


def test_gru_matches_torch_float32(gru_backend):
    _compare(gru_backend, np.float32, 2, True, False, True, True)


@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (1, 2, 3), (4, 1, 1)])
def test_gru_edge_shapes(gru_backend, T, B, H):
    _compare(gru_backend, F64, 1, True, False, True, True, T=T, B=B, I=2, H=H)


# --------------------------------------------------------------------------
# 2. lengths vs one torch run per sequence; token ids vs one-hot input
# --------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_gru_lengths_match_per_sequence_torch(gru_backend, num_layers,
                                              bidirectional):
    T, B, I, H = 6, 3, 4, 5
    D = 2 if bidirectional else 1
    lengths = np.array([4, 6, 1])
    rng = np.random.default_rng(7)
    tm = _torch_gru(I, H, num_layers, True, bidirectional, seed=2)
    layer = _fr_like(tm, F64, gru_backend)
    sshape = (D * num_layers, B, H)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal(sshape)
    out, hn = layer(x, h0, lengths=lengths)
    g_out = rng.standard_normal((T, B, D * H))   # padding entries too: ignored
    g_hn = rng.standard_normal(sshape)
    grad_x, grad_h0 = layer.backward(g_out, g_hn)

    exp_out, exp_hn = np.zeros((T, B, D * H)), np.zeros(sshape)
    exp_gx, exp_gh0 = np.zeros((T, B, I)), np.zeros(sshape)
    for b, L in enumerate(lengths):
        xb, h0b = _t(x[:L, b:b + 1], grad=True), _t(h0[:, b:b + 1], grad=True)
        ob, hb = tm(xb, h0b)
        exp_out[:L, b], exp_hn[:, b] = _np(ob)[:, 0], _np(hb)[:, 0]
        torch.autograd.backward([ob, hb], [_t(g_out[:L, b:b + 1]),
                                           _t(g_hn[:, b:b + 1])])
        exp_gx[:L, b], exp_gh0[:, b] = _np(xb.grad)[:, 0], _np(h0b.grad)[:, 0]
    for b, L in enumerate(lengths):
        assert np.all(out[L:, b] == 0) and np.all(grad_x[L:, b] == 0)
    assert_close(out, exp_out, F64, "out")
    assert_close(hn, exp_hn, F64, "h_n")
    assert_close(grad_x, exp_gx, F64, "grad_x")
    assert_close(grad_h0, exp_gh0, F64, "grad_h0")
    _check_param_grads(layer, tm, F64, "summed per-sequence")


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_gru_token_ids_match_one_hot_torch(gru_backend, num_layers,
                                           bidirectional):
    T, B, I, H = 5, 3, 4, 5
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(11)
    tm = _torch_gru(I, H, num_layers, True, bidirectional, seed=4)
    layer = _fr_like(tm, F64, gru_backend)
    ids = rng.integers(0, I, size=(T, B))
    ids[0, 0], ids[1, 0] = 0, I - 1
    h0 = rng.standard_normal((D * num_layers, B, H))
    out, hn = layer(ids, h0)
    h0t = _t(h0, grad=True)
    out_t, hn_t = tm(F.one_hot(torch.from_numpy(ids), I).to(torch.float64), h0t)
    assert_close(out, _np(out_t), F64, "out")
    assert_close(hn, _np(hn_t), F64, "h_n")
    g_out, g_hn = rng.standard_normal(out.shape), rng.standard_normal(hn.shape)
    grad_x, grad_h0 = layer.backward(g_out, g_hn)
    torch.autograd.backward([out_t, hn_t], [_t(g_out), _t(g_hn)])
    assert grad_x is None
    assert_close(grad_h0, _np(h0t.grad), F64, "grad_h0")
    _check_param_grads(layer, tm, F64)


# --------------------------------------------------------------------------
# 3. fr.GRUCell vs nn.GRUCell
# --------------------------------------------------------------------------
@pytest.mark.parametrize("batched,with_hx,bias,dtype", [
    (True, True, True, F64), (True, False, False, F64),
    (False, True, True, F64), (True, True, True, np.float32)])
def test_gru_cell_matches_torch(gru_backend, batched, with_hx, bias, dtype):
    B, I, H = 3, 4, 5
    rng = np.random.default_rng(13)
    torch.manual_seed(6)
    tc = torch.nn.GRUCell(I, H, bias=bias).to(TORCH_DTYPE[np.dtype(dtype)])
    cell = fr.GRUCell(I, H, bias, dtype=dtype, backend=gru_backend)
    cell.load_state_dict(tc.state_dict())
    lead = (B,) if batched else ()
    x = rng.standard_normal(lead + (I,)).astype(dtype)
    h0 = (rng.standard_normal(lead + (H,)) if with_hx
          else np.zeros(lead + (H,))).astype(dtype)
    cell(rng.standard_normal(lead + (I,)).astype(dtype))   # a decoy call
    h1 = cell(x, h0) if with_hx else cell(x)
    xt, h0t = _t(x, grad=True), _t(h0, grad=True)
    h1_t = tc(xt, h0t)
    assert h1.dtype == np.dtype(dtype) and h1.shape == lead + (H,)
    assert_close(h1, _np(h1_t), dtype, "h1")
    g = rng.standard_normal(h1.shape).astype(dtype)
    grad_x, grad_h0 = cell.backward(g)
    h1_t.backward(_t(g))
    assert_close(grad_x, _np(xt.grad), dtype, "grad_x")
    assert_close(grad_h0, _np(h0t.grad), dtype, "grad_h0")
    _check_param_grads(cell, tc, dtype, "cell")


# --------------------------------------------------------------------------
# 4. SequenceModel + TrainStep (fused) and gradient_flow vs torch
# --------------------------------------------------------------------------
def _model(backend, I, H, O, num_layers=1, bias=True, bidirectional=False,
           loss="cross_entropy", readout="all", seed=0):
    core = fr.GRU(I, H, num_layers, bias, bidirectional=bidirectional,
                  dtype=F64, seed=seed, backend=backend)
    model = fr.SequenceModel(core, O, loss=loss, readout=readout)
    return model, TorchModel(model.state_dict(), I, H, O, num_layers, "gru",
                             bias, bidirectional, loss, readout)


OPTIMIZERS = {
    "sgd": ("sgd", {"lr": 0.1, "momentum": 0.0}),
    "sgd_momentum": ("sgd", {"lr": 0.1, "momentum": 0.9}),
    "adam": ("adam", {"lr": 0.05}),
    "adagrad": ("adagrad", {"lr": 0.1}),
}


def _train_and_compare(backend, *, opt_spec, clip=None, loss="cross_entropy",
                       readout="all", num_layers=1, bias=True,
                       bidirectional=False, lengths=None, with_hx=False,
                       steps=3, T=5, B=3, I=3, H=4, O=3, seed=0):
    """`steps` fused TrainSteps against the same steps in torch (the shared
    train_and_compare of _torch_oracle.py)."""
    D = 2 if bidirectional else 1
    model, tmodel = _model(backend, I, H, O, num_layers, bias, bidirectional,
                           loss, readout, seed)
    make_hx = ((lambda rng: rng.standard_normal((D * num_layers, B, H)))
               if with_hx else None)
    train_and_compare(model, tmodel, np.random.default_rng(seed),
                      opt_spec=opt_spec, clip=clip, loss=loss, readout=readout,
                      lengths=lengths, make_hx=make_hx, steps=steps, T=T, B=B,
                      I=I, O=O, compare_state=lambda got, want, what: assert_close(
                          got, _np(want), F64, what))


@pytest.mark.parametrize("clip", [None, "norm", "value"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_gru_train_step_optimizers_and_clipping(gru_backend, opt, clip):
    _train_and_compare(gru_backend, opt_spec=OPTIMIZERS[opt], clip=clip)


@pytest.mark.parametrize("loss,readout,num_layers,bidirectional,bias,with_hx,lengths", [
    ("cross_entropy", "all", 2, True, True, True, None),
    ("mse", "last", 1, True, False, False, [5, 2, 1]),
    ("cross_entropy", "all", 2, False, True, False, [3, 5, 4]),
])
def test_gru_train_step_models(gru_backend, loss, readout, num_layers,
                               bidirectional, bias, with_hx, lengths):
    _train_and_compare(gru_backend, opt_spec=OPTIMIZERS["adam"], loss=loss,
                       readout=readout, num_layers=num_layers, bias=bias,
                       bidirectional=bidirectional, with_hx=with_hx,
                       lengths=None if lengths is None else np.array(lengths))


def test_gru_gradient_flow_matches_torch(gru_backend):
    """gradient_flow: |dL/dh_t| of the top layer (both directions) per step,
    the total gradient reaching h_t; torch steps nn.GRUCell with the
    model's weights and keeps every h_t."""
    T, B, I, H, O = 5, 2, 3, 4, 3
    rng = np.random.default_rng(5)
    model, _ = _model(gru_backend, I, H, O, 1, True, True)
    sd = model.state_dict()
    x = rng.standard_normal((T, B, I))
    y = rng.integers(0, O, (T, B))
    flow = fr.gradient_flow(model, x, y)
    hs = [[None] * T, [None] * T]
    for d, sfx in enumerate(("_l0", "_l0_reverse")):
        cell = torch.nn.GRUCell(I, H).double()
        cell.load_state_dict({k: _t(sd[k + sfx]) for k in
                              ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
        h = torch.zeros(B, H, dtype=torch.float64)
        for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
            h = cell(_t(x[t]), h)
            h.retain_grad()
            hs[d][t] = h
    out = torch.stack([torch.cat([hs[0][t], hs[1][t]], 1) for t in range(T)])
    z = out @ _t(sd["weight_out"]).T + _t(sd["bias_out"])
    L = F.cross_entropy(z.reshape(-1, O), _t(y).reshape(-1), reduction="sum") / B
    L.backward()
    exp = np.sqrt([sum(float((hs[d][t].grad ** 2).sum()) for d in range(2))
                   for t in range(T)])
    assert_close(flow, exp, F64, "gradient flow")


# --------------------------------------------------------------------------
# 5. construction
# --------------------------------------------------------------------------
def test_gru_arguments_and_init():
    with pytest.raises(NotImplementedError, match="dropout"):
        fr.GRU(2, 3, 2, dropout=0.5, backend="numpy")
    with pytest.raises(ValueError, match="dropout"):
        fr.GRU(2, 3, dropout=1.5, backend="numpy")
    with pytest.raises(ValueError, match="identity"):
        fr.GRU(2, 3, init="identity", backend="numpy")
    with pytest.raises(ValueError, match="identity"):
        fr.GRUCell(2, 3, init="identity", backend="numpy")
    g = fr.GRU(2, 3, 2, bidirectional=True, init="orthogonal", seed=1,
               backend="numpy")
    w = g.state_dict()["weight_hh_l1_reverse"]
    for blk in range(3):   # orthogonal per gate block (r, z, n)
        q = w[blk * 3:(blk + 1) * 3]
        assert_close(q @ q.T, np.eye(3), np.float32, f"block {blk}")
    assert np.all(g.state_dict()["bias_ih_l0"] == 0)
    for scheme in ("default", "xavier"):
        a = fr.GRU(2, 3, init=scheme, seed=4, backend="numpy").state_dict()
        b = fr.GRU(2, 3, init=scheme, seed=4, backend="numpy").state_dict()
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert "GRU(2, 3" in repr(g) and "nonlinearity" not in repr(g)
