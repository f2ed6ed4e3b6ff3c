"""PyTorch as the oracle for fr.RNN, fr.SequenceModel and fr.TrainStep.

Every test runs on every available backend (conftest's ``backend`` fixture)
and compares fastrnn with torch on identical weights: ``torch.nn.RNN`` (plain
and packed sequences), per-sequence torch runs, or an RNN unrolled by hand in
torch where nn.RNN has no equivalent (sigmoid, dL/dh_t clamping). Float64 is
held to 1e-9 relative and float32 to 1e-4 (conftest's one tolerance table).
Shapes are tiny on purpose: T <= 6, B <= 3, H <= 5, I <= 4.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastrnn as fr  # noqa: E402
from conftest import assert_close  # noqa: E402

from _torch_oracle import (  # noqa: E402
    F64, TORCH_DTYPE, TorchModel, _check_param_grads, _compare_params, _grad_norm,
    _make_data, _np, _t, train_and_compare, unrolled)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _torch_rnn(I, H, num_layers=1, nonlinearity="tanh", bias=True,
               batch_first=False, bidirectional=False, dtype=F64, seed=0):
    """torch.nn.RNN with torch's own (seeded) initialisation."""
    torch.manual_seed(seed)
    m = torch.nn.RNN(I, H, num_layers=num_layers, nonlinearity=nonlinearity,
                     bias=bias, batch_first=batch_first,
                     bidirectional=bidirectional)
    return m.to(TORCH_DTYPE[np.dtype(dtype)])


def _fr_like(tm, dtype, backend):
    """An fr.RNN with tm's configuration, loaded from tm.state_dict() as is."""
    layer = fr.RNN(tm.input_size, tm.hidden_size, tm.num_layers,
                   tm.nonlinearity, tm.bias, tm.batch_first, tm.bidirectional,
                   dtype=dtype, backend=backend)
    layer.load_state_dict(tm.state_dict())
    sd = layer.state_dict()
    ref = {k: _np(v) for k, v in tm.state_dict().items()}
    assert sorted(sd) == sorted(ref), "state_dict keys differ from torch's"
    for k in ref:
        assert_close(sd[k], ref[k], dtype, f"loaded {k}")
    return layer


# --------------------------------------------------------------------------
# 1. fr.RNN forward/backward vs torch.nn.RNN
# --------------------------------------------------------------------------
def _compare_with_torch_rnn(backend, dtype, nonlinearity, num_layers,
                            bidirectional, batch_first, with_hx, bias,
                            give_grad_hn=True, T=5, B=3, I=4, H=5, seed=0):
    rng = np.random.default_rng(seed)
    D = 2 if bidirectional else 1
    tm = _torch_rnn(I, H, num_layers, nonlinearity, bias, batch_first,
                    bidirectional, dtype, seed)
    layer = _fr_like(tm, dtype, backend)

    def make_x(T_):
        shape = (B, T_, I) if batch_first else (T_, B, I)
        return rng.standard_normal(shape).astype(dtype)

    x = make_x(T)
    h0 = (rng.standard_normal((D * num_layers, B, H)).astype(dtype)
          if with_hx else None)

    # a decoy forward first: backward must go through the *last* call
    layer(make_x(T + 1))
    out, hn = layer(x, h0)

    xt = _t(x, grad=True)
    h0t = _t(h0 if with_hx else np.zeros((D * num_layers, B, H), dtype),
             grad=True)
    out_t, hn_t = tm(xt, h0t)
    assert out.dtype == np.dtype(dtype) and hn.dtype == np.dtype(dtype)
    assert_close(out, _np(out_t), dtype, "out")
    assert_close(hn, _np(hn_t), dtype, "h_n")

    g_out = rng.standard_normal(out.shape).astype(dtype)
    if give_grad_hn:
        g_hn = rng.standard_normal(hn.shape).astype(dtype)
        grad_x, grad_hx = layer.backward(g_out, g_hn)
        torch.autograd.backward([out_t, hn_t], [_t(g_out), _t(g_hn)])
    else:
        grad_x, grad_hx = layer.backward(g_out)
        out_t.backward(_t(g_out))

    assert_close(grad_x, _np(xt.grad), dtype, "grad_x")
    # with hx=None the initial state is zeros; a returned grad_hx must be
    # the gradient with respect to that zero state
    if with_hx or grad_hx is not None:
        assert_close(grad_hx, _np(h0t.grad), dtype, "grad_hx")
    _check_param_grads(layer, tm, dtype)


# (nonlinearity, num_layers, bidirectional, batch_first, with_hx, bias):
# every value of each option meets every value of the others at least once
RNN_CASES = [
    ("tanh", 1, False, False, False, True),
    ("tanh", 1, False, True, True, False),
    ("tanh", 1, True, False, True, True),
    ("tanh", 2, False, False, True, True),
    ("tanh", 2, True, True, False, True),
    ("tanh", 2, True, False, True, False),
    ("relu", 1, False, False, True, True),
    ("relu", 1, True, True, False, False),
    ("relu", 2, False, True, True, True),
    ("relu", 2, True, False, True, True),
    ("relu", 2, False, False, False, False),
]


@pytest.mark.parametrize(
    "nonlinearity,num_layers,bidirectional,batch_first,with_hx,bias",
    RNN_CASES)
def test_rnn_matches_torch_float64(backend, nonlinearity, num_layers,
                                   bidirectional, batch_first, with_hx, bias):
    _compare_with_torch_rnn(backend, F64, nonlinearity, num_layers,
                            bidirectional, batch_first, with_hx, bias)


def test_rnn_matches_torch_float32(backend):
    _compare_with_torch_rnn(backend, np.float32, "tanh", 2, True, False,
                            True, True)


def test_rnn_backward_without_grad_hn(backend):
    """grad_hn=None means no gradient arrives at the final state."""
    _compare_with_torch_rnn(backend, F64, "tanh", 2, True, True, True, True,
                            give_grad_hn=False)


def test_rnn_sigmoid_matches_unrolled_torch(backend):
    """torch.nn.RNN has no sigmoid: compare with an RNN unrolled in torch."""
    T, B, I, H, L = 4, 3, 3, 4, 2
    rng = np.random.default_rng(3)
    layer = fr.RNN(I, H, L, "sigmoid", bidirectional=True, dtype=F64,
                   seed=1, backend=backend)
    params = {k: _t(v, grad=True) for k, v in layer.state_dict().items()}
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((2 * L, B, H))
    out, hn = layer(x, h0)
    xt, h0t = _t(x, grad=True), _t(h0, grad=True)
    out_t, hn_t = unrolled(params, xt, L, "sigmoid", True, hx=h0t)
    assert_close(out, _np(out_t), F64, "out")
    assert_close(hn, _np(hn_t), F64, "h_n")
    g_out, g_hn = rng.standard_normal(out.shape), rng.standard_normal(hn.shape)
    grad_x, grad_hx = layer.backward(g_out, g_hn)
    torch.autograd.backward([out_t, hn_t], [_t(g_out), _t(g_hn)])
    assert_close(grad_x, _np(xt.grad), F64, "grad_x")
    assert_close(grad_hx, _np(h0t.grad), F64, "grad_hx")
    assert sorted(layer.grads) == sorted(params)
    for k, p in params.items():
        assert_close(layer.grads[k], _np(p.grad), F64, f"grad {k}")


# --------------------------------------------------------------------------
# 2. variable lengths vs one torch run per sequence
# --------------------------------------------------------------------------
# (nonlinearity, num_layers, bidirectional, batch_first, with_hx)
LENGTH_CASES = [
    ("tanh", 1, False, False, True),
    ("tanh", 1, True, False, False),
    ("relu", 2, True, True, True),
    ("tanh", 2, False, True, True),
]


@pytest.mark.parametrize(
    "nonlinearity,num_layers,bidirectional,batch_first,with_hx", LENGTH_CASES)
def test_rnn_lengths_match_per_sequence_torch(backend, nonlinearity,
                                              num_layers, bidirectional,
                                              batch_first, with_hx):
    T, B, I, H = 6, 3, 4, 5
    D = 2 if bidirectional else 1
    lengths = np.array([4, 6, 1])  # shorter, full, a single step
    rng = np.random.default_rng(7)
    # torch runs time-major; only fastrnn sees batch_first layouts
    tm = _torch_rnn(I, H, num_layers, nonlinearity, True, False,
                    bidirectional, F64, seed=2)
    layer = fr.RNN(I, H, num_layers, nonlinearity, True, batch_first,
                   bidirectional, dtype=F64, backend=backend)
    layer.load_state_dict(tm.state_dict())

    def to_layout(a):  # time-major (T, B, ...) -> the layer's layout
        return np.swapaxes(a, 0, 1).copy() if batch_first else a

    def from_layout(a):
        return np.swapaxes(a, 0, 1) if batch_first else a

    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((D * num_layers, B, H)) if with_hx else None
    if with_hx:
        out, hn = layer(to_layout(x), h0, lengths=lengths)
    else:
        out, hn = layer(to_layout(x), lengths=lengths)
    out = from_layout(out)

    g_out = rng.standard_normal((T, B, D * H))  # padding entries too:
    g_hn = rng.standard_normal(hn.shape)        # they must be ignored
    grad_x, grad_hx = layer.backward(to_layout(g_out), g_hn)
    grad_x = from_layout(grad_x)

    exp_out = np.zeros((T, B, D * H))
    exp_hn = np.zeros_like(hn)
    exp_gx = np.zeros((T, B, I))
    exp_ghx = np.zeros((D * num_layers, B, H))
    for b, L in enumerate(lengths):
        xb = _t(x[:L, b:b + 1], grad=True)
        h0b = _t(h0[:, b:b + 1] if with_hx
                 else np.zeros((D * num_layers, 1, H)), grad=True)
        ob, hb = tm(xb, h0b)
        exp_out[:L, b] = _np(ob)[:, 0]
        exp_hn[:, b] = _np(hb)[:, 0]
        # parameter grads accumulate over the sequences: their sum
        torch.autograd.backward(
            [ob, hb], [_t(g_out[:L, b:b + 1]), _t(g_hn[:, b:b + 1])])
        exp_gx[:L, b] = _np(xb.grad)[:, 0]
        exp_ghx[:, b] = _np(h0b.grad)[:, 0]

    for b, L in enumerate(lengths):
        assert np.all(out[L:, b] == 0), f"out of sequence {b} after {L} steps"
        assert np.all(grad_x[L:, b] == 0), f"grad_x of {b} after {L} steps"
    assert_close(out, exp_out, F64, "out")
    assert_close(hn, exp_hn, F64, "h_n")
    assert_close(grad_x, exp_gx, F64, "grad_x")
    if with_hx or grad_hx is not None:
        assert_close(grad_hx, exp_ghx, F64, "grad_hx")
    _check_param_grads(layer, tm, F64, "summed per-sequence")


# --------------------------------------------------------------------------
# 3. token ids vs torch on the one-hot input
# --------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers,bidirectional,nonlinearity,id_dtype", [
    (1, False, "tanh", np.int64),
    (2, True, "relu", np.int32),
])
def test_rnn_token_ids_match_one_hot_torch(backend, num_layers, bidirectional,
                                           nonlinearity, id_dtype):
    T, B, I, H = 5, 3, 4, 5
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(11)
    tm = _torch_rnn(I, H, num_layers, nonlinearity, True, False,
                    bidirectional, F64, seed=4)
    layer = _fr_like(tm, F64, backend)
    ids = rng.integers(0, I, size=(T, B)).astype(id_dtype)
    ids[0, 0], ids[1, 0] = 0, I - 1  # both ends of the range
    h0 = rng.standard_normal((D * num_layers, B, H))

    out, hn = layer(ids, h0)
    x1h = F.one_hot(torch.from_numpy(ids.astype(np.int64)), I).to(torch.float64)
    h0t = _t(h0, grad=True)
    out_t, hn_t = tm(x1h, h0t)
    assert_close(out, _np(out_t), F64, "out")
    assert_close(hn, _np(hn_t), F64, "h_n")

    g_out, g_hn = rng.standard_normal(out.shape), rng.standard_normal(hn.shape)
    grad_x, grad_hx = layer.backward(g_out, g_hn)
    torch.autograd.backward([out_t, hn_t], [_t(g_out), _t(g_hn)])
    assert grad_x is None, "grad_x must be None for integer inputs"
    assert_close(grad_hx, _np(h0t.grad), F64, "grad_hx")
    _check_param_grads(layer, tm, F64)


# --------------------------------------------------------------------------
# 4.-6. SequenceModel + TrainStep vs torch (nn.RNN + nn.Linear + optimizer)
# --------------------------------------------------------------------------
def _train_and_compare(backend, *, opt_spec, clip=None, loss="cross_entropy",
                       readout="all", num_layers=1, nonlinearity="tanh",
                       bias=True, bidirectional=False, lengths=None,
                       with_hx=False, steps=3, T=5, B=3, I=3, H=4, O=3,
                       seed=0):
    """An RNN SequenceModel against torch over ``steps`` training steps
    (``train_and_compare``); ``with_hx``: a random initial h0."""
    sshape = ((2 if bidirectional else 1) * num_layers, B, H)
    core = fr.RNN(I, H, num_layers, nonlinearity, bias,
                  bidirectional=bidirectional, dtype=F64, seed=seed,
                  backend=backend)
    model = fr.SequenceModel(core, O, loss=loss, readout=readout)
    tmodel = TorchModel(model.state_dict(), I, H, O, num_layers,
                        nonlinearity, bias, bidirectional, loss, readout)
    train_and_compare(
        model, tmodel, np.random.default_rng(seed), opt_spec=opt_spec,
        clip=clip, loss=loss, readout=readout, lengths=lengths,
        make_hx=(lambda rng: rng.standard_normal(sshape)) if with_hx else None,
        compare_state=lambda got, exp, what: assert_close(got, _np(exp), F64, what),
        steps=steps, T=T, B=B, I=I, O=O)


OPTIMIZERS = {
    "sgd": ("sgd", {"lr": 0.1, "momentum": 0.0}),
    "sgd_momentum": ("sgd", {"lr": 0.1, "momentum": 0.9}),
    "adam": ("adam", {"lr": 0.05}),
    "adagrad": ("adagrad", {"lr": 0.1}),
}


@pytest.mark.parametrize("clip", [None, "norm", "value"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_train_step_optimizers_and_clipping(backend, opt, clip):
    _train_and_compare(backend, opt_spec=OPTIMIZERS[opt], clip=clip)


# (loss, readout, num_layers, nonlinearity, bidirectional, bias, with_hx)
MODEL_CASES = [
    ("cross_entropy", "all", 2, "tanh", True, True, False),
    ("mse", "all", 1, "relu", False, False, True),
    ("cross_entropy", "last", 2, "relu", False, True, True),
    ("mse", "last", 1, "tanh", True, True, False),
    ("mse", "all", 2, "tanh", False, True, False),
]


@pytest.mark.parametrize(
    "loss,readout,num_layers,nonlinearity,bidirectional,bias,with_hx",
    MODEL_CASES)
def test_train_step_losses_and_readouts(backend, loss, readout, num_layers,
                                        nonlinearity, bidirectional, bias,
                                        with_hx):
    _train_and_compare(backend, opt_spec=OPTIMIZERS["sgd_momentum"],
                       loss=loss, readout=readout, num_layers=num_layers,
                       nonlinearity=nonlinearity, bias=bias,
                       bidirectional=bidirectional, with_hx=with_hx)


@pytest.mark.parametrize("loss,readout,num_layers,bidirectional", [
    ("cross_entropy", "all", 1, True),
    ("mse", "last", 2, False),
    ("cross_entropy", "last", 1, True),
])
def test_train_step_lengths_match_packed_torch(backend, loss, readout,
                                               num_layers, bidirectional):
    """Padding carries no loss and no gradient: torch on packed sequences,
    loss masked to the valid steps; readout "last" reads step lengths[b]-1."""
    _train_and_compare(backend, opt_spec=OPTIMIZERS["adam"], loss=loss,
                       readout=readout, num_layers=num_layers,
                       bidirectional=bidirectional, with_hx=True,
                       lengths=np.array([3, 6, 1]), T=6, clip="norm")


@pytest.mark.parametrize("nonlinearity,bidirectional", [
    ("tanh", False), ("relu", True), ("sigmoid", False)])
def test_train_step_state_clip_matches_clamped_torch_bptt(
        backend, nonlinearity, bidirectional):
    """state_clip=c == a torch hook clamping dL/dh_t to [-c, c] at every h_t."""
    T, B, I, H, O, c, lr = 5, 3, 3, 4, 3, 0.02, 0.5
    rng = np.random.default_rng(5)
    core = fr.RNN(I, H, 1, nonlinearity, bidirectional=bidirectional,
                  dtype=F64, seed=3, backend=backend)
    model = fr.SequenceModel(core, O, loss="cross_entropy", readout="all")
    tmodel = TorchModel(model.state_dict(), I, H, O, 1, nonlinearity, True,
                        bidirectional, "cross_entropy", "all")
    params = tmodel.parameters()
    step = fr.TrainStep(model, fr.SGD(lr), state_clip=c)
    t_opt = torch.optim.SGD(params, lr=lr)
    xs, ys = _make_data(rng, T, B, I, O, "cross_entropy", "all", 2)

    for k in range(2):
        res = step(xs[k], ys[k])
        t_opt.zero_grad()
        log = []
        L, hn_t = tmodel.loss_fn(xs[k], ys[k], state_clip=c, clamp_log=log)
        L.backward()
        assert len(log) == T * (2 if bidirectional else 1)
        assert any(log), "test setup: c too large, nothing was clamped"
        g = _grad_norm(params)
        t_opt.step()
        assert_close(res.loss, L.item(), F64, f"step {k}: loss")
        assert_close(res.grad_norm, g, F64, f"step {k}: grad_norm")
        assert not res.skipped
        assert_close(res.hx, _np(hn_t), F64, f"step {k}: hx")
    _compare_params(model, tmodel, "after 2 state-clipped steps")


@pytest.mark.parametrize("num_layers,nonlinearity", [(1, "tanh"), (2, "relu")])
def test_train_step_truncated_bptt_carries_hx(backend, num_layers,
                                              nonlinearity):
    """res.hx fed back as hx == torch carrying the detached final state."""
    T, B, I, H, O, steps = 4, 2, 3, 4, 3, 3
    rng = np.random.default_rng(9)
    core = fr.RNN(I, H, num_layers, nonlinearity, dtype=F64, seed=5,
                  backend=backend)
    model = fr.SequenceModel(core, O, loss="cross_entropy", readout="all")
    tmodel = TorchModel(model.state_dict(), I, H, O, num_layers,
                        nonlinearity, True, False, "cross_entropy", "all")
    params = tmodel.parameters()
    step = fr.TrainStep(model, fr.SGD(0.2, momentum=0.9))
    t_opt = torch.optim.SGD(params, lr=0.2, momentum=0.9)
    xs, ys = _make_data(rng, T, B, I, O, "cross_entropy", "all", steps)

    hx = None
    h_carry = np.zeros((num_layers, B, H))
    for k in range(steps):
        res = step(xs[k], ys[k], hx=hx)
        t_opt.zero_grad()
        L, hn_t = tmodel.loss_fn(xs[k], ys[k], hx=h_carry)
        L.backward()
        g = _grad_norm(params)
        t_opt.step()
        assert_close(res.loss, L.item(), F64, f"chunk {k}: loss")
        assert_close(res.grad_norm, g, F64, f"chunk {k}: grad_norm")
        assert_close(res.hx, _np(hn_t), F64, f"chunk {k}: hx")
        hx, h_carry = res.hx, _np(hn_t).copy()
    _compare_params(model, tmodel, f"after {steps} chunks")
