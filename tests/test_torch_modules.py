"""fastrnn.torch against torch.nn: outputs and every gradient over the
options (layers, directions, batch_first, packed, unbatched, hx, cells,
float32/float64), gradcheck, opcheck, torch.compile, replace(), state_dict
round trips, return_cell_states against an LSTMCell loop."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

import fastrnn.torch as frt  # noqa: E402
from conftest import assert_close  # noqa: E402
from fastrnn.torch import ops  # noqa: E402

TD = {np.float32: torch.float32, np.float64: torch.float64}


@pytest.fixture(params=["function", "custom_op"])
def path(request, monkeypatch):
    """Eager calls through ops._Eager (the default) or through the custom
    ops with their registered autograd (what compiled code runs)."""
    monkeypatch.setattr(ops, "EAGER_FUNCTION", request.param == "function")
    return request.param


def _np(t):
    return t.detach().cpu().numpy()


def _close(a, b, dtype, what):
    assert_close(_np(a), _np(b), dtype, what)


def _pair(kind, I, H, L=1, bidir=False, batch_first=False, dtype=np.float64,
          nonlinearity="tanh", bias=True, seed=0):
    """(torch module, fastrnn.torch module) with the same weights."""
    torch.manual_seed(seed)
    td = TD[dtype]
    if kind == "lstm":
        tm = nn.LSTM(I, H, L, bias=bias, batch_first=batch_first,
                     bidirectional=bidir, dtype=td)
        fm = frt.LSTM(I, H, L, bias=bias, batch_first=batch_first,
                      bidirectional=bidir, dtype=td)
    else:
        tm = nn.RNN(I, H, L, nonlinearity=nonlinearity, bias=bias,
                    batch_first=batch_first, bidirectional=bidir, dtype=td)
        fm = frt.RNN(I, H, L, nonlinearity=nonlinearity, bias=bias,
                     batch_first=batch_first, bidirectional=bidir, dtype=td)
    fm.load_state_dict(tm.state_dict())
    return tm, fm


def _run(m, x, hx, lstm):
    """Forward, a random-weighted loss over every output, backward; returns
    the outputs and gradients (x, hx parts, parameters by name)."""
    for p in m.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    leaves = []
    if hx is not None:
        hx = tuple(h.detach().clone().requires_grad_(True) for h in hx) if lstm \
            else hx.detach().clone().requires_grad_(True)
        leaves = list(hx) if lstm else [hx]
    out, st = m(x, hx)
    parts = [out] + (list(st) if lstm else [st])
    g = torch.Generator().manual_seed(1)
    loss = sum((p * torch.randn(p.shape, generator=g, dtype=p.dtype)).sum()
               for p in parts)
    loss.backward()
    grads = {"x": x.grad, **{f"hx{i}": h.grad for i, h in enumerate(leaves)}}
    grads.update({n: p.grad for n, p in m.named_parameters()})
    return parts, grads


def _compare(tm, fm, x, hx, lstm, dtype):
    tp, tg = _run(tm, x, hx, lstm)
    fp, fg = _run(fm, x, hx, lstm)
    for i, (a, b) in enumerate(zip(fp, tp)):
        _close(a, b, dtype, f"output {i}")
    assert sorted(fg) == sorted(tg)
    for k in tg:
        _close(fg[k], tg[k], dtype, f"grad {k}")


CASES = [  # kind, L, bidir, batch_first, hx given, dtype
    ("lstm", 1, False, False, False, np.float64),
    ("lstm", 2, True, False, True, np.float64),
    ("lstm", 3, False, True, True, np.float32),
    ("lstm", 1, True, True, False, np.float32),
    ("tanh", 1, False, False, True, np.float64),
    ("tanh", 3, True, True, False, np.float64),
    ("relu", 2, False, False, True, np.float32),
    ("relu", 1, True, True, True, np.float64),
]


@pytest.mark.parametrize("kind,L,bidir,bf,with_hx,dtype", CASES)
def test_parity_with_torch(kind, L, bidir, bf, with_hx, dtype, path):
    T, B, I, H = 5, 3, 4, 3
    lstm = kind == "lstm"
    tm, fm = _pair("lstm" if lstm else "rnn", I, H, L, bidir, bf, dtype,
                   nonlinearity="tanh" if lstm else kind)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((B, T, I) if bf else (T, B, I), generator=g, dtype=TD[dtype])
    hx = None
    if with_hx:
        D = 2 if bidir else 1
        hs = [torch.randn(L * D, B, H, generator=g, dtype=TD[dtype]) for _ in range(2)]
        hx = tuple(hs) if lstm else hs[0]
    _compare(tm, fm, x, hx, lstm, dtype)


@pytest.mark.parametrize("kind", ["lstm", "tanh"])
def test_edge_shapes_and_no_bias(kind):
    """T = 1, B = 1, H = 1, bias=False."""
    lstm = kind == "lstm"
    for T, B, H, bias in ((1, 2, 3, True), (4, 1, 1, False)):
        tm, fm = _pair("lstm" if lstm else "rnn", 2, H, 2, True, False,
                       np.float64, bias=bias)
        x = torch.randn(T, B, 2, dtype=torch.float64)
        _compare(tm, fm, x, None, lstm, np.float64)


@pytest.mark.parametrize("kind", ["lstm", "tanh"])
def test_unbatched_input(kind):
    lstm = kind == "lstm"
    tm, fm = _pair("lstm" if lstm else "rnn", 3, 4, 2, True, False, np.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    hs = [torch.randn(4, 4, dtype=torch.float64) for _ in range(2)]
    _compare(tm, fm, x, tuple(hs) if lstm else hs[0], lstm, np.float64)
    _compare(tm, fm, x, None, lstm, np.float64)


@pytest.mark.parametrize("kind,dtype", [("lstm", np.float64), ("tanh", np.float32)])
@pytest.mark.parametrize("bf", [False, True])
def test_packed_sequence(kind, dtype, bf, path):
    """A PackedSequence in gives one out: same data, batch sizes and
    indices as torch's, and the same gradients (unsorted lengths, hx)."""
    lstm = kind == "lstm"
    T, B, I, H = 6, 4, 3, 3
    tm, fm = _pair("lstm" if lstm else "rnn", I, H, 2, True, bf, dtype)
    lengths = torch.tensor([3, 6, 1, 3])
    g = torch.Generator().manual_seed(0)
    xp = torch.randn((B, T, I) if bf else (T, B, I), generator=g, dtype=TD[dtype])
    hs = [torch.randn(4, B, H, generator=g, dtype=TD[dtype]) for _ in range(2)]
    res = {}
    for name, m in (("torch", tm), ("fastrnn", fm)):
        for p in m.parameters():
            p.grad = None
        x = xp.detach().clone().requires_grad_(True)
        hx = tuple(h.detach().clone().requires_grad_(True) for h in hs)
        packed = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)
        out, st = m(packed, hx if lstm else hx[0])
        st = list(st) if lstm else [st]
        w = torch.randn(out.data.shape, generator=torch.Generator().manual_seed(2),
                        dtype=TD[dtype])
        loss = (out.data * w).sum() + sum((s * (k + 1)).sum() for k, s in enumerate(st))
        loss.backward()
        res[name] = (out, st, x.grad, [h.grad for h in hx[:len(st)]],
                     {n: p.grad for n, p in m.named_parameters()})
    (to, ts, tx, th, tg), (fo, fs, fx, fh, fg) = res["torch"], res["fastrnn"]
    assert type(fo) is type(to)
    assert torch.equal(fo.batch_sizes, to.batch_sizes)
    assert torch.equal(fo.sorted_indices, to.sorted_indices)
    assert torch.equal(fo.unsorted_indices, to.unsorted_indices)
    _close(fo.data, to.data, dtype, "packed output")
    for a, b in zip(fs, ts):
        _close(a, b, dtype, "final state")
    _close(fx, tx, dtype, "grad x")
    for a, b in zip(fh, th):
        _close(a, b, dtype, "grad hx")
    for k in tg:
        _close(fg[k], tg[k], dtype, f"grad {k}")


@pytest.mark.parametrize("kind", ["lstm", "tanh", "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cells(kind, dtype):
    lstm = kind == "lstm"
    torch.manual_seed(0)
    td = TD[dtype]
    if lstm:
        tm, fm = nn.LSTMCell(3, 4, dtype=td), frt.LSTMCell(3, 4, dtype=td)
    else:
        tm = nn.RNNCell(3, 4, nonlinearity=kind, dtype=td)
        fm = frt.RNNCell(3, 4, nonlinearity=kind, dtype=td)
    fm.load_state_dict(tm.state_dict())
    for shape in ((2,), ()):
        x = torch.randn(shape + (3,), dtype=td)
        for with_hx in (False, True):
            hs = [torch.randn(shape + (4,), dtype=td) for _ in range(2)]
            hx = (tuple(hs) if lstm else hs[0]) if with_hx else None
            res = []
            for m in (tm, fm):
                for p in m.parameters():
                    p.grad = None
                xx = x.clone().requires_grad_(True)
                h = None
                if hx is not None:
                    h = tuple(v.clone().requires_grad_(True) for v in hx) if lstm \
                        else hx.clone().requires_grad_(True)
                out = m(xx, h)
                outs = list(out) if lstm else [out]
                sum(((k + 2) * o * o).sum() for k, o in enumerate(outs)).backward()
                hg = [] if h is None else [v.grad for v in (h if lstm else (h,))]
                res.append((outs, xx.grad, hg, [p.grad for p in m.parameters()]))
            (to, tx, th, tp), (fo, fx, fh, fp) = res
            for a, b in zip(fo + [fx] + fh + fp, to + [tx] + th + tp):
                _close(a, b, dtype, f"{kind} cell {shape} hx={with_hx}")


def test_sigmoid_rnn_against_manual_loop():
    torch.manual_seed(0)
    fm = frt.RNN(3, 4, nonlinearity="sigmoid", dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    out, h_n = fm(x)
    (out.sum() + 2 * h_n.sum()).backward()
    gx = x.grad.clone()
    gp = [p.grad.clone() for p in fm.parameters()]
    x.grad = None
    params = [p.detach().clone().requires_grad_(True) for p in fm.parameters()]
    W_ih, W_hh, b_ih, b_hh = params
    h = torch.zeros(2, 4, dtype=torch.float64)
    outs = []
    for t in range(5):
        h = torch.sigmoid(x[t] @ W_ih.T + b_ih + h @ W_hh.T + b_hh)
        outs.append(h)
    ref = torch.stack(outs)
    _close(out, ref, np.float64, "output")
    (ref.sum() + 2 * h.sum()).backward()
    _close(gx, x.grad, np.float64, "grad x")
    for a, p in zip(gp, params):
        _close(a, p.grad, np.float64, "grad param")


def test_gradients_accumulate_and_two_forwards():
    """Two forwards before one backward keep separate caches; .grad
    accumulates over backward calls as torch's does."""
    tm, fm = _pair("lstm", 3, 4, 2, True, False, np.float64)
    x1 = torch.randn(4, 2, 3, dtype=torch.float64)
    x2 = torch.randn(6, 2, 3, dtype=torch.float64)
    for m in (tm, fm):
        (m(x1)[0].pow(2).sum() + m(x2)[0].sum()).backward()
        m(x1)[0].sum().backward()
    for (n, a), (_, b) in zip(fm.named_parameters(), tm.named_parameters()):
        _close(a.grad, b.grad, np.float64, n)


def test_retain_graph_and_double_backward_error(path):
    _, fm = _pair("lstm", 3, 4, 1)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    loss = fm(x)[0].pow(2).sum()
    loss.backward(retain_graph=True)
    g1 = x.grad.clone()
    loss.backward()
    _close(x.grad, 2 * g1, np.float64, "second backward")
    loss = fm(x)[0].pow(2).sum()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_gradcheck_float64():
    torch.manual_seed(0)
    fm = frt.LSTM(2, 2, 2, bidirectional=True, dtype=torch.float64)
    names = [n for n, _ in fm.named_parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in fm.parameters()]

    def f(x, h0, c0, *ps):
        out, (h, c), cs = torch.func.functional_call(
            fm, dict(zip(names, ps)), (x, (h0, c0)),
            {"return_cell_states": True})
        return out, h, c, cs

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))
    fr = frt.RNN(2, 3, dtype=torch.float64)
    rn = [n for n, _ in fr.named_parameters()]
    rp = [p.detach().clone().requires_grad_(True) for p in fr.parameters()]
    assert torch.autograd.gradcheck(
        lambda x, *ps: torch.func.functional_call(fr, dict(zip(rn, ps)), (x,)),
        (x, *rp))


@pytest.mark.parametrize("mode,cells", [("lstm", True), ("tanh", False)])
def test_opcheck(mode, cells):
    torch.manual_seed(0)
    lstm = mode == "lstm"
    m = (frt.LSTM if lstm else frt.RNN)(3, 2, 2, bidirectional=True,
                                        dtype=torch.float64)
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = (torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True) if lstm
          else None)
    args = (x, params, h0, c0, torch.tensor([4, 2]), mode, 2, 2, 2, True, False,
            "numba", cells)
    torch.library.opcheck(torch.ops.fastrnn.core_forward.default, args)
    # no initial state, all steps valid
    args = (x, params, None, None, None, mode, 2, 2, 2, True, False, "numba",
            cells)
    torch.library.opcheck(torch.ops.fastrnn.core_forward.default, args)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    lstm = frt.LSTM(3, 4)
    head = nn.Linear(4, 2)

    def f(x):
        return head(lstm(x)[0]).sum()

    x = torch.randn(5, 2, 3)
    f(x).backward()
    want = [p.grad.clone() for p in list(lstm.parameters()) + list(head.parameters())]
    for p in list(lstm.parameters()) + list(head.parameters()):
        p.grad = None
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = cf(x)
    loss.backward()
    assert_close(loss.item(), f(x).item(), np.float32)
    for a, p in zip(want, list(lstm.parameters()) + list(head.parameters())):
        _close(p.grad, a, np.float32, "compiled grad")


def test_return_cell_states_against_lstmcell_loop(path):
    """c_seq (and the gradients through it) of a 2-layer bidirectional LSTM
    against nn.LSTM for layer 0 and two nn.LSTMCell loops for the top
    layer, batch_first."""
    torch.manual_seed(0)
    T, B, I, H = 5, 2, 3, 4
    fm = frt.LSTM(I, H, 2, bidirectional=True, batch_first=True,
                  dtype=torch.float64)
    sd = fm.state_dict()
    low = nn.LSTM(I, H, 1, bidirectional=True, batch_first=True,
                  dtype=torch.float64)
    low.load_state_dict({k: v for k, v in sd.items() if "_l0" in k})
    cells = []
    for sfx in ("_l1", "_l1_reverse"):
        c = nn.LSTMCell(2 * H, H, dtype=torch.float64)
        c.load_state_dict({k.replace(sfx, ""): v for k, v in sd.items()
                           if k.endswith(sfx)})
        cells.append(c)
    x = torch.randn(B, T, I, dtype=torch.float64)
    w = torch.randn(B, T, 2 * H, dtype=torch.float64)

    xf = x.clone().requires_grad_(True)
    out, (h_n, c_n), cs = fm(xf, return_cell_states=True)
    assert cs.shape == out.shape
    (cs * w).sum().add(out.sum()).backward()

    xr = x.clone().requires_grad_(True)
    mid = low(xr)[0]
    seqs = []
    for d, cell in enumerate(cells):
        h = c = torch.zeros(B, H, dtype=torch.float64)
        outs, cst = [None] * T, [None] * T
        for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
            h, c = cell(mid[:, t], (h, c))
            outs[t], cst[t] = h, c
        seqs.append((torch.stack(outs, 1), torch.stack(cst, 1)))
    ref_out = torch.cat([s[0] for s in seqs], 2)
    ref_cs = torch.cat([s[1] for s in seqs], 2)
    _close(cs, ref_cs, np.float64, "c_seq")
    _close(out, ref_out, np.float64, "output")
    _close(c_n[2], seqs[0][1][:, -1], np.float64, "c_n top forward")
    (ref_cs * w).sum().add(ref_out.sum()).backward()
    _close(xf.grad, xr.grad, np.float64, "grad x through c_seq")
    for k, p in fm.named_parameters():
        if "_l0" in k:
            ref = dict(low.named_parameters())[k].grad
        else:
            d = 1 if k.endswith("_reverse") else 0
            name = k.replace("_l1_reverse", "").replace("_l1", "")
            ref = dict(cells[d].named_parameters())[name].grad
        _close(p.grad, ref, np.float64, f"grad {k}")


def test_return_cell_states_packed_and_rnn_error():
    torch.manual_seed(0)
    fm = frt.LSTM(2, 3)
    x = torch.randn(4, 3, 2)
    packed = pack_padded_sequence(x, torch.tensor([4, 2, 3]), enforce_sorted=False)
    out, (h, c), cs = fm(packed, return_cell_states=True)
    assert torch.equal(cs.batch_sizes, out.batch_sizes)
    full, _, cfull = fm(x, return_cell_states=True)
    _close(cs.data, pack_padded_sequence(cfull, torch.tensor([4, 2, 3]),
                                         enforce_sorted=False).data,
           np.float32, "packed c_seq")
    with pytest.raises(ValueError, match="return_cell_states"):
        frt.RNN(2, 3)(x, return_cell_states=True)


def _lm(cls_lstm, dropout=0.0):
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4, dtype=torch.float64)
            self.encoder = nn.Module()
            self.encoder.rnn = cls_lstm(4, 5, 2, batch_first=True,
                                        dtype=torch.float64, dropout=dropout)
            self.out = nn.Linear(5, 7, dtype=torch.float64)

        def forward(self, ids):
            return self.out(self.encoder.rnn(self.emb(ids))[0])
    return LM()


def test_replace_trains_like_torch():
    torch.manual_seed(0)
    ref = _lm(nn.LSTM)
    model = _lm(nn.LSTM)
    model.load_state_dict(ref.state_dict())
    assert frt.replace(model) is model
    assert isinstance(model.encoder.rnn, frt.LSTM)
    res = []
    for m in (ref, model):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(3)
        for _ in range(20):
            ids = torch.randint(0, 7, (3, 6), generator=g)
            y = torch.randint(0, 7, (3, 6), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(ids).reshape(-1, 7), y.reshape(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            opt.step()
        res.append(m.state_dict())
    for k in res[0]:
        _close(res[1][k], res[0][k], np.float64, k)
    # the optimizer's in-place updates kept the parameters one flat buffer
    rnn = model.encoder.rnn
    ps = list(rnn.parameters())
    assert all(b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
               for a, b in zip(ps, ps[1:]))


def test_replace_warns_and_keeps_unsupported():
    model = _lm(nn.LSTM, dropout=0.5)
    with pytest.warns(UserWarning, match=r"encoder\.rnn.*dropout"):
        frt.replace(model)
    assert type(model.encoder.rnn) is nn.LSTM
    lone = nn.RNN(2, 3, nonlinearity="relu")
    new = frt.replace(lone)
    assert isinstance(new, frt.RNN) and new.nonlinearity == "relu"
    shared = nn.LSTM(2, 3)
    shared.weight_hh_l0.requires_grad_(False)
    both = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)}).eval()
    frt.replace(both)
    assert both["a"] is both["b"][0] and isinstance(both["a"], frt.LSTM)
    assert not both["a"].training
    assert not both["a"].weight_hh_l0.requires_grad
    assert both["a"].weight_ih_l0.requires_grad


def test_state_dict_round_trips():
    torch.manual_seed(0)
    fm = frt.LSTM(3, 4, 2, bidirectional=True)
    tm = nn.LSTM(3, 4, 2, bidirectional=True)
    tm.load_state_dict(fm.state_dict())
    x = torch.randn(5, 2, 3)
    _close(tm(x)[0], fm(x)[0], np.float32, "fastrnn -> torch")
    tm2 = nn.LSTM(3, 4, 2, bidirectional=True)
    fm.load_state_dict(tm2.state_dict())
    _close(fm(x)[0], tm2(x)[0], np.float32, "torch -> fastrnn")
    assert list(fm.state_dict()) == list(tm2.state_dict())
    # assign=True and dtype conversion re-flatten the parameters
    fm.load_state_dict(tm.state_dict(), assign=True)
    _close(fm(x)[0], tm(x)[0], np.float32, "assign=True")
    fm.double()
    tm.double()
    _close(fm(x.double())[0], tm(x.double())[0], np.float64, ".double()")
    ps = list(fm.parameters())
    assert all(b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
               for a, b in zip(ps, ps[1:]))


def test_unsupported_options_and_bad_input():
    with pytest.raises(NotImplementedError, match="dropout"):
        frt.LSTM(2, 3, 2, dropout=0.5)
    with pytest.raises(NotImplementedError, match="proj_size"):
        frt.LSTM(2, 3, proj_size=2)
    with pytest.raises(TypeError, match="dtype"):
        frt.RNN(2, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match="nonlinearity"):
        frt.RNN(2, 3, nonlinearity="gelu")
    m = frt.LSTM(2, 3)
    with pytest.raises(ValueError, match="input"):
        m(torch.randn(4, 2, 5))
    with pytest.raises(TypeError, match="input"):
        m(torch.randn(4, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="h_0"):
        m(torch.randn(4, 2, 2), (torch.zeros(1, 3, 3), torch.zeros(1, 2, 3)))


def test_seeded_init_and_torch_init():
    a = frt.LSTM(3, 4, init="orthogonal", seed=1)
    b = frt.LSTM(3, 4, init="orthogonal", seed=1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    torch.manual_seed(5)
    t = nn.RNN(3, 4, 2)
    torch.manual_seed(5)
    f = frt.RNN(3, 4, 2)
    for p, q in zip(t.parameters(), f.parameters()):
        assert torch.equal(p, q)


def test_import_fastrnn_does_not_import_torch():
    code = "import sys, fastrnn; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gathered_parameters_and_no_leaked_caches():
    """Parameters that are not one buffer (replaced .data) are gathered per
    call and still give torch's numbers; every forward's cache is released
    when its graph goes (after backward, or at once without grad)."""
    tm, fm = _pair("lstm", 3, 4, 2, True, False, np.float64)
    fm.weight_hh_l1.data = fm.weight_hh_l1.data.clone()
    assert ops._flat_params(list(fm.parameters())).data_ptr() != \
        fm.weight_ih_l0.data_ptr()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    _compare(tm, fm, x, None, True, np.float64)
    with torch.no_grad():
        fm(x)
    fm(x)
    assert not ops._TABLE


def test_readme_example_runs():
    """The README's fastrnn.torch example, as written."""
    import os
    import re
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    text = open(readme, encoding="utf-8").read()
    section = text[text.index("## PyTorch modules: `fastrnn.torch`"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = {}
    exec(compile(code, "README.md", "exec"), env)
    assert isinstance(env["model"].rnn, frt.LSTM)
    assert tuple(env["c_seq"].shape) == (20, 8, 32)


def test_deepcopy_and_pickle():
    import copy
    import io
    _, fm = _pair("lstm", 3, 4, 2, True, False, np.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(fm, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fm), torch.load(buf, weights_only=False)):
        _close(other(x)[0], fm(x)[0], np.float64, "copy")
        ps = list(other.parameters())
        assert all(b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
                   for a, b in zip(ps, ps[1:]))
        assert ps[0].data_ptr() != next(fm.parameters()).data_ptr()
