"""PyTorch as the oracle for fr.LSTM, fr.LSTMCell, and fr.SequenceModel /
fr.TrainStep / fr.gradient_flow with an LSTM core.

Every test runs on every available backend (conftest's ``backend`` fixture)
and compares fastrnn with torch on identical weights (torch's state_dict
loaded as is): ``torch.nn.LSTM`` (plain and packed sequences),
``torch.nn.LSTMCell``, per-sequence torch runs, or an LSTM unrolled by hand
in torch where nn.LSTM has no equivalent (dL/dh_t clamping, the gradient
reaching every h_t). Float64 is held to 1e-9 relative and float32 to 1e-4
(conftest's one tolerance table). Shapes are tiny on purpose:
T <= 6, B <= 3, H <= 5, I <= 4.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastrnn as fr  # noqa: E402
from conftest import assert_close  # noqa: E402

from _torch_oracle import (  # noqa: E402
    F64, TORCH_DTYPE, TorchModel, _check_param_grads, _compare_params, _grad_norm,
    _make_data, _np, _t, train_and_compare)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _torch_lstm(I, H, num_layers=1, bias=True, batch_first=False,
                bidirectional=False, dtype=F64, seed=0):
    """torch.nn.LSTM with torch's own (seeded) initialisation."""
    torch.manual_seed(seed)
    m = torch.nn.LSTM(I, H, num_layers=num_layers, bias=bias,
                      batch_first=batch_first, bidirectional=bidirectional)
    return m.to(TORCH_DTYPE[np.dtype(dtype)])


def _check_loaded(layer, tm, dtype):
    sd = layer.state_dict()
    ref = {k: _np(v) for k, v in tm.state_dict().items()}
    assert sorted(sd) == sorted(ref), "state_dict keys differ from torch's"
    for k in ref:
        assert sd[k].shape == ref[k].shape, f"shape of {k}"
        assert_close(sd[k], ref[k], dtype, f"loaded {k}")


def _fr_like(tm, dtype, backend):
    """An fr.LSTM with tm's configuration, loaded from tm.state_dict() as is."""
    layer = fr.LSTM(tm.input_size, tm.hidden_size, tm.num_layers, tm.bias,
                    tm.batch_first, tm.bidirectional, dtype=dtype,
                    backend=backend)
    layer.load_state_dict(tm.state_dict())
    _check_loaded(layer, tm, dtype)
    return layer


# --------------------------------------------------------------------------
# 1. fr.LSTM forward/backward vs torch.nn.LSTM
# --------------------------------------------------------------------------
def _compare_with_torch_lstm(backend, dtype, num_layers, bidirectional,
                             batch_first, with_hx, bias, give_grad_hn=True,
                             T=5, B=3, I=4, H=5, seed=0):
    rng = np.random.default_rng(seed)
    D = 2 if bidirectional else 1
    tm = _torch_lstm(I, H, num_layers, bias, batch_first, bidirectional,
                     dtype, seed)
    layer = _fr_like(tm, dtype, backend)
    sshape = (D * num_layers, B, H)

    def make_x(T_):
        shape = (B, T_, I) if batch_first else (T_, B, I)
        return rng.standard_normal(shape).astype(dtype)

    x = make_x(T)
    h0 = rng.standard_normal(sshape).astype(dtype) if with_hx else None
    c0 = rng.standard_normal(sshape).astype(dtype) if with_hx else None

    # a decoy forward first: backward must go through the *last* call
    layer(make_x(T + 1))
    if with_hx:
        out, (hn, cn) = layer(x, (h0, c0))
    else:
        out, (hn, cn) = layer(x)

    xt = _t(x, grad=True)
    h0t = _t(h0 if with_hx else np.zeros(sshape, dtype), grad=True)
    c0t = _t(c0 if with_hx else np.zeros(sshape, dtype), grad=True)
    out_t, (hn_t, cn_t) = tm(xt, (h0t, c0t))
    for a in (out, hn, cn):
        assert a.dtype == np.dtype(dtype)
    assert_close(out, _np(out_t), dtype, "out")
    assert_close(hn, _np(hn_t), dtype, "h_n")
    assert_close(cn, _np(cn_t), dtype, "c_n")

    g_out = rng.standard_normal(out.shape).astype(dtype)
    if give_grad_hn:
        g_hn = rng.standard_normal(hn.shape).astype(dtype)
        g_cn = rng.standard_normal(cn.shape).astype(dtype)
        grad_x, (grad_h0, grad_c0) = layer.backward(g_out, (g_hn, g_cn))
        torch.autograd.backward([out_t, hn_t, cn_t],
                                [_t(g_out), _t(g_hn), _t(g_cn)])
    else:
        grad_x, (grad_h0, grad_c0) = layer.backward(g_out)
        out_t.backward(_t(g_out))

    assert_close(grad_x, _np(xt.grad), dtype, "grad_x")
    # with hx=None the initial state is zeros; a returned gradient must be
    # the gradient with respect to that zero state
    if with_hx or grad_h0 is not None:
        assert_close(grad_h0, _np(h0t.grad), dtype, "grad_h0")
    if with_hx or grad_c0 is not None:
        assert_close(grad_c0, _np(c0t.grad), dtype, "grad_c0")
    _check_param_grads(layer, tm, dtype)


# (num_layers, bidirectional, batch_first, with_hx, bias): every value of
# each option meets every value of the others at least once
LSTM_CASES = [
    (1, False, False, False, True),
    (1, False, True, True, False),
    (1, True, False, True, True),
    (1, True, True, False, False),
    (2, False, False, True, True),
    (2, True, True, False, True),
    (2, True, False, True, False),
    (3, False, True, True, True),
    (3, True, False, False, False),
    (3, True, True, True, True),
]


@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first,with_hx,bias", LSTM_CASES)
def test_lstm_matches_torch_float64(backend, num_layers, bidirectional,
                                    batch_first, with_hx, bias):
    _compare_with_torch_lstm(backend, F64, num_layers, bidirectional,
                             batch_first, with_hx, bias)


def test_lstm_matches_torch_float32(backend):
    _compare_with_torch_lstm(backend, np.float32, 2, True, False, True, True)


def test_lstm_backward_without_grad_hn(backend):
    """grad_hn=None means no gradient arrives at the final (h, c)."""
    _compare_with_torch_lstm(backend, F64, 2, True, True, True, True,
                             give_grad_hn=False)


# --------------------------------------------------------------------------
# 2. variable lengths vs one torch run per sequence
# --------------------------------------------------------------------------
# (num_layers, bidirectional, batch_first, with_hx)
LENGTH_CASES = [
    (1, False, False, True),
    (1, True, False, False),
    (2, True, True, True),
    (2, False, True, False),
]


@pytest.mark.parametrize("num_layers,bidirectional,batch_first,with_hx",
                         LENGTH_CASES)
def test_lstm_lengths_match_per_sequence_torch(backend, num_layers,
                                               bidirectional, batch_first,
                                               with_hx):
    T, B, I, H = 6, 3, 4, 5
    D = 2 if bidirectional else 1
    lengths = np.array([4, 6, 1])  # shorter, full, a single step
    rng = np.random.default_rng(7)
    # torch runs time-major; only fastrnn sees batch_first layouts
    tm = _torch_lstm(I, H, num_layers, True, False, bidirectional, F64,
                     seed=2)
    layer = fr.LSTM(I, H, num_layers, True, batch_first, bidirectional,
                    dtype=F64, backend=backend)
    layer.load_state_dict(tm.state_dict())

    def to_layout(a):  # time-major (T, B, ...) -> the layer's layout
        return np.swapaxes(a, 0, 1).copy() if batch_first else a

    def from_layout(a):
        return np.swapaxes(a, 0, 1) if batch_first else a

    sshape = (D * num_layers, B, H)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal(sshape) if with_hx else np.zeros(sshape)
    c0 = rng.standard_normal(sshape) if with_hx else np.zeros(sshape)
    if with_hx:
        out, (hn, cn) = layer(to_layout(x), (h0, c0), lengths=lengths)
    else:
        out, (hn, cn) = layer(to_layout(x), lengths=lengths)
    out = from_layout(out)

    g_out = rng.standard_normal((T, B, D * H))  # padding entries too:
    g_hn = rng.standard_normal(sshape)          # they must be ignored
    g_cn = rng.standard_normal(sshape)
    grad_x, (grad_h0, grad_c0) = layer.backward(to_layout(g_out),
                                                (g_hn, g_cn))
    grad_x = from_layout(grad_x)

    exp_out = np.zeros((T, B, D * H))
    exp_hn, exp_cn = np.zeros(sshape), np.zeros(sshape)
    exp_gx = np.zeros((T, B, I))
    exp_gh0, exp_gc0 = np.zeros(sshape), np.zeros(sshape)
    for b, L in enumerate(lengths):
        xb = _t(x[:L, b:b + 1], grad=True)
        h0b = _t(h0[:, b:b + 1], grad=True)
        c0b = _t(c0[:, b:b + 1], grad=True)
        ob, (hb, cb) = tm(xb, (h0b, c0b))
        exp_out[:L, b] = _np(ob)[:, 0]
        exp_hn[:, b], exp_cn[:, b] = _np(hb)[:, 0], _np(cb)[:, 0]
        # parameter grads accumulate over the sequences: their sum
        torch.autograd.backward(
            [ob, hb, cb],
            [_t(g_out[:L, b:b + 1]), _t(g_hn[:, b:b + 1]),
             _t(g_cn[:, b:b + 1])])
        exp_gx[:L, b] = _np(xb.grad)[:, 0]
        exp_gh0[:, b], exp_gc0[:, b] = _np(h0b.grad)[:, 0], _np(c0b.grad)[:, 0]

    for b, L in enumerate(lengths):
        assert np.all(out[L:, b] == 0), f"out of sequence {b} after {L} steps"
        assert np.all(grad_x[L:, b] == 0), f"grad_x of {b} after {L} steps"
    assert_close(out, exp_out, F64, "out")
    assert_close(hn, exp_hn, F64, "h_n")
    assert_close(cn, exp_cn, F64, "c_n")
    assert_close(grad_x, exp_gx, F64, "grad_x")
    if with_hx or grad_h0 is not None:
        assert_close(grad_h0, exp_gh0, F64, "grad_h0")
    if with_hx or grad_c0 is not None:
        assert_close(grad_c0, exp_gc0, F64, "grad_c0")
    _check_param_grads(layer, tm, F64, "summed per-sequence")


# --------------------------------------------------------------------------
# 3. token ids vs torch on the one-hot input
# --------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers,bidirectional,id_dtype", [
    (1, False, np.int64),
    (2, True, np.int32),
])
def test_lstm_token_ids_match_one_hot_torch(backend, num_layers,
                                            bidirectional, id_dtype):
    T, B, I, H = 5, 3, 4, 5
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(11)
    tm = _torch_lstm(I, H, num_layers, True, False, bidirectional, F64,
                     seed=4)
    layer = _fr_like(tm, F64, backend)
    ids = rng.integers(0, I, size=(T, B)).astype(id_dtype)
    ids[0, 0], ids[1, 0] = 0, I - 1  # both ends of the range
    sshape = (D * num_layers, B, H)
    h0, c0 = rng.standard_normal(sshape), rng.standard_normal(sshape)

    out, (hn, cn) = layer(ids, (h0, c0))
    x1h = F.one_hot(torch.from_numpy(ids.astype(np.int64)), I).to(torch.float64)
    h0t, c0t = _t(h0, grad=True), _t(c0, grad=True)
    out_t, (hn_t, cn_t) = tm(x1h, (h0t, c0t))
    assert_close(out, _np(out_t), F64, "out")
    assert_close(hn, _np(hn_t), F64, "h_n")
    assert_close(cn, _np(cn_t), F64, "c_n")

    g_out = rng.standard_normal(out.shape)
    g_hn, g_cn = rng.standard_normal(sshape), rng.standard_normal(sshape)
    grad_x, (grad_h0, grad_c0) = layer.backward(g_out, (g_hn, g_cn))
    torch.autograd.backward([out_t, hn_t, cn_t],
                            [_t(g_out), _t(g_hn), _t(g_cn)])
    assert grad_x is None, "grad_x must be None for integer inputs"
    assert_close(grad_h0, _np(h0t.grad), F64, "grad_h0")
    assert_close(grad_c0, _np(c0t.grad), F64, "grad_c0")
    _check_param_grads(layer, tm, F64)


# --------------------------------------------------------------------------
# 4. fr.LSTMCell vs torch.nn.LSTMCell
# --------------------------------------------------------------------------
# (batched, with_hx, bias, dtype)
CELL_CASES = [
    (True, True, True, F64),
    (True, False, False, F64),
    (False, True, True, F64),
    (False, False, True, F64),
    (False, True, False, F64),
    (True, True, True, np.float32),
]


@pytest.mark.parametrize("batched,with_hx,bias,dtype", CELL_CASES)
def test_lstm_cell_matches_torch(backend, batched, with_hx, bias, dtype):
    B, I, H = 3, 4, 5
    rng = np.random.default_rng(13)
    torch.manual_seed(6)
    tc = torch.nn.LSTMCell(I, H, bias=bias).to(TORCH_DTYPE[np.dtype(dtype)])
    cell = fr.LSTMCell(I, H, bias, dtype=dtype, backend=backend)
    cell.load_state_dict(tc.state_dict())
    _check_loaded(cell, tc, dtype)

    lead = (B,) if batched else ()
    x = rng.standard_normal(lead + (I,)).astype(dtype)
    h0 = rng.standard_normal(lead + (H,)).astype(dtype)
    c0 = rng.standard_normal(lead + (H,)).astype(dtype)
    if not with_hx:
        h0, c0 = np.zeros_like(h0), np.zeros_like(c0)

    # a decoy call first: backward must go through the *last* call
    cell(rng.standard_normal(lead + (I,)).astype(dtype))
    h1, c1 = cell(x, (h0, c0)) if with_hx else cell(x)
    xt, h0t, c0t = _t(x, grad=True), _t(h0, grad=True), _t(c0, grad=True)
    h1_t, c1_t = tc(xt, (h0t, c0t))
    for a in (h1, c1):
        assert a.dtype == np.dtype(dtype) and a.shape == lead + (H,)
    assert_close(h1, _np(h1_t), dtype, "h1")
    assert_close(c1, _np(c1_t), dtype, "c1")

    g_h1 = rng.standard_normal(h1.shape).astype(dtype)
    g_c1 = rng.standard_normal(c1.shape).astype(dtype)
    grad_x, (grad_h0, grad_c0) = cell.backward((g_h1, g_c1))
    torch.autograd.backward([h1_t, c1_t], [_t(g_h1), _t(g_c1)])
    assert_close(grad_x, _np(xt.grad), dtype, "grad_x")
    assert_close(grad_h0, _np(h0t.grad), dtype, "grad_h0")
    assert_close(grad_c0, _np(c0t.grad), dtype, "grad_c0")
    _check_param_grads(cell, tc, dtype, "cell")


# --------------------------------------------------------------------------
# 5.-8. SequenceModel + TrainStep / gradient_flow vs torch
# --------------------------------------------------------------------------
def _compare_state(got, exp, what):
    """An LSTM state (h, c) from fastrnn vs torch's (h, c)."""
    assert isinstance(got, tuple) and len(got) == 2, f"{what}: not a pair"
    assert_close(got[0], _np(exp[0]), F64, f"{what} h")
    assert_close(got[1], _np(exp[1]), F64, f"{what} c")


def _lstm_model(backend, I, H, O, num_layers=1, bias=True,
                bidirectional=False, loss="cross_entropy", readout="all",
                seed=0):
    core = fr.LSTM(I, H, num_layers, bias, bidirectional=bidirectional,
                   dtype=F64, seed=seed, backend=backend)
    model = fr.SequenceModel(core, O, loss=loss, readout=readout)
    tmodel = TorchModel(model.state_dict(), I, H, O, num_layers, "lstm",
                        bias, bidirectional, loss, readout)
    return model, tmodel


def _train_and_compare(backend, *, opt_spec, clip=None, loss="cross_entropy",
                       readout="all", num_layers=1, bias=True,
                       bidirectional=False, lengths=None, with_hx=False,
                       steps=3, T=5, B=3, I=3, H=4, O=3, seed=0):
    """An LSTM SequenceModel against torch over ``steps`` training steps
    (``train_and_compare``); ``with_hx``: a random initial (h0, c0)."""
    sshape = ((2 if bidirectional else 1) * num_layers, B, H)
    model, tmodel = _lstm_model(backend, I, H, O, num_layers, bias,
                                bidirectional, loss, readout, seed)
    train_and_compare(
        model, tmodel, np.random.default_rng(seed), opt_spec=opt_spec,
        clip=clip, loss=loss, readout=readout, lengths=lengths,
        make_hx=(lambda rng: (rng.standard_normal(sshape),
                              rng.standard_normal(sshape))) if with_hx else None,
        compare_state=_compare_state, steps=steps, T=T, B=B, I=I, O=O)


OPTIMIZERS = {
    "sgd": ("sgd", {"lr": 0.1, "momentum": 0.0}),
    "sgd_momentum": ("sgd", {"lr": 0.1, "momentum": 0.9}),
    "adam": ("adam", {"lr": 0.05}),
    "adagrad": ("adagrad", {"lr": 0.1}),
}


@pytest.mark.parametrize("loss,readout", [("cross_entropy", "all"),
                                          ("mse", "last")])
@pytest.mark.parametrize("clip", [None, "norm", "value"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_lstm_train_step_optimizers_and_clipping(backend, opt, clip, loss,
                                                 readout):
    _train_and_compare(backend, opt_spec=OPTIMIZERS[opt], clip=clip,
                       loss=loss, readout=readout)


# (loss, readout, num_layers, bidirectional, bias, with_hx)
MODEL_CASES = [
    ("cross_entropy", "all", 2, True, True, True),
    ("mse", "all", 1, True, False, True),
    ("cross_entropy", "last", 2, False, False, False),
]


@pytest.mark.parametrize(
    "loss,readout,num_layers,bidirectional,bias,with_hx", MODEL_CASES)
def test_lstm_train_step_models(backend, loss, readout, num_layers,
                                bidirectional, bias, with_hx):
    _train_and_compare(backend, opt_spec=OPTIMIZERS["sgd_momentum"],
                       loss=loss, readout=readout, num_layers=num_layers,
                       bias=bias, bidirectional=bidirectional,
                       with_hx=with_hx)


@pytest.mark.parametrize("loss,readout,num_layers,bidirectional", [
    ("cross_entropy", "all", 1, True),
    ("mse", "last", 2, True),
])
def test_lstm_train_step_lengths_match_packed_torch(backend, loss, readout,
                                                    num_layers, bidirectional):
    """Padding carries no loss and no gradient: torch on packed sequences,
    loss masked to the valid steps; readout "last" reads step lengths[b]-1."""
    _train_and_compare(backend, opt_spec=OPTIMIZERS["adam"], loss=loss,
                       readout=readout, num_layers=num_layers,
                       bidirectional=bidirectional, with_hx=True,
                       lengths=np.array([3, 6, 1]), T=6, clip="norm")


# --------------------------------------------------------------------------
# 6. state_clip: dL/dh_t clamped, dL/dc_t not
# --------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers,bidirectional", [
    (1, False), (1, True), (2, True)])
def test_lstm_state_clip_clamps_h_grad_not_c_grad(backend, num_layers,
                                                  bidirectional):
    """state_clip=c == a torch hook clamping dL/dh_t to [-c, c] at every h_t
    (every layer and direction), with dL/dc_t left alone."""
    T, B, I, H, O, c, lr = 6, 3, 3, 4, 3, 0.02, 0.5
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(5)
    model, tmodel = _lstm_model(backend, I, H, O, num_layers, True,
                                bidirectional, "cross_entropy", "all",
                                seed=3)
    # forget and output gates near 1: dL/dc_t accumulates over the steps
    # and exceeds c, so clamping it too would change the result
    sd = model.state_dict()
    for k in sd:
        if k.startswith("bias_ih"):
            sd[k][H:2 * H] += 3.0
            sd[k][3 * H:] += 3.0
    model.load_state_dict(sd)
    tmodel = TorchModel(sd, I, H, O, num_layers, "lstm", True,
                        bidirectional, "cross_entropy", "all")
    params = tmodel.parameters()
    step = fr.TrainStep(model, fr.SGD(lr), state_clip=c)
    t_opt = torch.optim.SGD(params, lr=lr)
    xs, ys = _make_data(rng, T, B, I, O, "cross_entropy", "all", 2)

    for k in range(2):
        res = step(xs[k], ys[k])
        t_opt.zero_grad()
        log, c_log = [], []
        L, hn_t = tmodel.loss_fn(xs[k], ys[k], state_clip=c, clamp_log=log,
                                 c_log=c_log)
        L.backward()
        assert len(log) == T * D * num_layers
        assert any(log), "test setup: c too large, nothing was clamped"
        assert any(c_log), "test setup: dL/dc_t never exceeds c"
        g = _grad_norm(params)
        t_opt.step()
        assert_close(res.loss, L.item(), F64, f"step {k}: loss")
        assert_close(res.grad_norm, g, F64, f"step {k}: grad_norm")
        assert not res.skipped
        _compare_state(res.hx, hn_t, f"step {k}: hx")
    _compare_params(model, tmodel, "after 2 state-clipped steps")


# --------------------------------------------------------------------------
# 7. truncated BPTT: res.hx = (h_n, c_n) carried across chunks
# --------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_lstm_train_step_truncated_bptt_carries_hx(backend, num_layers,
                                                   bidirectional):
    """res.hx fed back as hx == torch carrying the detached final (h, c)."""
    T, B, I, H, O, steps = 4, 2, 3, 4, 3, 3
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(9)
    model, tmodel = _lstm_model(backend, I, H, O, num_layers, True,
                                bidirectional, "cross_entropy", "all",
                                seed=5)
    params = tmodel.parameters()
    step = fr.TrainStep(model, fr.SGD(0.2, momentum=0.9))
    t_opt = torch.optim.SGD(params, lr=0.2, momentum=0.9)
    xs, ys = _make_data(rng, T, B, I, O, "cross_entropy", "all", steps)

    hx = None
    carry = (np.zeros((D * num_layers, B, H)), np.zeros((D * num_layers, B, H)))
    for k in range(steps):
        res = step(xs[k], ys[k], hx=hx)
        t_opt.zero_grad()
        L, (hn_t, cn_t) = tmodel.loss_fn(xs[k], ys[k], hx=carry)
        L.backward()
        g = _grad_norm(params)
        t_opt.step()
        assert_close(res.loss, L.item(), F64, f"chunk {k}: loss")
        assert_close(res.grad_norm, g, F64, f"chunk {k}: grad_norm")
        _compare_state(res.hx, (hn_t, cn_t), f"chunk {k}: hx")
        hx, carry = res.hx, (_np(hn_t).copy(), _np(cn_t).copy())
    _compare_params(model, tmodel, f"after {steps} chunks")


# --------------------------------------------------------------------------
# 8. gradient_flow: ||dL/dh_t|| of the top layer per step
# --------------------------------------------------------------------------
def _torch_gradient_flow(tmodel, x, y, hx=None, lengths=None):
    """(T,) L2 norm over batch rows and directions of dL/dh_t of the top
    layer, dL/dh_t being the total gradient reaching h_t (retain_grad on
    every unrolled h_t). With lengths: one torch run per sequence, its loss
    divided by the batch size (the batch loss is their sum)."""
    T, B = x.shape[0], x.shape[1]
    D = 2 if tmodel.bidirectional else 1
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    sq = np.zeros(T)
    for b, Lb in enumerate(lengths):
        xb = x[:Lb, b:b + 1]
        yb = y[:Lb, b:b + 1] if tmodel.readout == "all" else y[b:b + 1]
        hxb = None
        if hx is not None:
            hxb = ((hx[0][:, b:b + 1], hx[1][:, b:b + 1])
                   if tmodel.mode == "lstm" else hx[:, b:b + 1])
        top = []
        L, _ = tmodel.loss_fn(xb, yb, hxb, top_hs=top)
        (L / B).backward()
        assert len(top) == D
        for d in range(D):
            for t in range(Lb):
                g = top[d][t].grad
                if g is not None:
                    sq[t] += float((g ** 2).sum())
    return np.sqrt(sq)


# (mode, num_layers, bidirectional, loss, readout, with_hx, with_lengths)
FLOW_CASES = [
    ("lstm", 1, False, "cross_entropy", "all", False, False),
    ("lstm", 2, True, "mse", "last", True, False),
    ("lstm", 2, True, "cross_entropy", "all", True, True),
    ("lstm", 1, False, "mse", "last", False, True),
    ("tanh", 1, True, "cross_entropy", "all", True, False),
    ("tanh", 2, True, "mse", "last", False, True),
]


@pytest.mark.parametrize(
    "mode,num_layers,bidirectional,loss,readout,with_hx,with_lengths",
    FLOW_CASES)
def test_gradient_flow_matches_torch(backend, mode, num_layers,
                                     bidirectional, loss, readout, with_hx,
                                     with_lengths):
    T, B, I, H, O = 6, 3, 3, 4, 3
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(17)
    if mode == "lstm":
        core = fr.LSTM(I, H, num_layers, bidirectional=bidirectional,
                       dtype=F64, seed=8, backend=backend)
    else:
        core = fr.RNN(I, H, num_layers, mode, bidirectional=bidirectional,
                      dtype=F64, seed=8, backend=backend)
    model = fr.SequenceModel(core, O, loss=loss, readout=readout)
    sd0 = model.state_dict()
    tmodel = TorchModel(sd0, I, H, O, num_layers, mode, True, bidirectional,
                        loss, readout)
    (x,), (y,) = _make_data(rng, T, B, I, O, loss, readout, 1)
    sshape = (D * num_layers, B, H)
    hx = None
    if with_hx:
        hx = ((rng.standard_normal(sshape), rng.standard_normal(sshape))
              if mode == "lstm" else rng.standard_normal(sshape))
    lengths = np.array([4, 6, 2]) if with_lengths else None

    flow = fr.gradient_flow(model, x, y, hx=hx, lengths=lengths)
    exp = _torch_gradient_flow(tmodel, x, y, hx, lengths)
    assert flow.shape == (T,)
    assert np.all(exp > 0), "test setup: a step without gradient"
    assert_close(flow, exp, F64, "gradient_flow")
    sd1 = model.state_dict()
    for k in sd0:
        assert np.array_equal(sd0[k], sd1[k]), f"gradient_flow changed {k}"
