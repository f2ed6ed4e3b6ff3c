"""fastrnn.torch.GRU / GRUCell against torch.nn.GRU / nn.GRUCell: outputs
and every gradient over the options (layers, directions, batch_first,
packed, unbatched, hx, float32/float64), both autograd paths, gradcheck,
opcheck, and replace() swapping nn.GRU."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

import fastrnn.torch as frt  # noqa: E402
from fastrnn.torch import ops  # noqa: E402
from test_torch_modules import TD, _close, _compare  # noqa: E402


@pytest.fixture(params=["function", "custom_op"])
def path(request, monkeypatch):
    monkeypatch.setattr(ops, "EAGER_FUNCTION", request.param == "function")
    return request.param


def _pair(I, H, L=1, bidir=False, batch_first=False, dtype=np.float64,
          bias=True, seed=0):
    torch.manual_seed(seed)
    kw = dict(bias=bias, batch_first=batch_first, bidirectional=bidir,
              dtype=TD[dtype])
    tm, fm = nn.GRU(I, H, L, **kw), frt.GRU(I, H, L, **kw)
    fm.load_state_dict(tm.state_dict())
    return tm, fm


@pytest.mark.parametrize("L,bidir,bf,with_hx,dtype", [
    (1, False, False, False, np.float64),
    (2, True, False, True, np.float64),
    (3, False, True, True, np.float32),
    (1, True, True, False, np.float32),
])
def test_gru_parity_with_torch(L, bidir, bf, with_hx, dtype, path):
    T, B, I, H = 5, 3, 4, 3
    tm, fm = _pair(I, H, L, bidir, bf, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((B, T, I) if bf else (T, B, I), generator=g, dtype=TD[dtype])
    hx = (torch.randn(L * (2 if bidir else 1), B, H, generator=g, dtype=TD[dtype])
          if with_hx else None)
    _compare(tm, fm, x, hx, False, dtype)


def test_gru_edge_shapes_no_bias_and_unbatched():
    for T, B, H, bias in ((1, 2, 3, True), (4, 1, 1, False)):
        tm, fm = _pair(2, H, 2, True, False, np.float64, bias=bias)
        _compare(tm, fm, torch.randn(T, B, 2, dtype=torch.float64), None, False,
                 np.float64)
    tm, fm = _pair(3, 4, 2, True)
    x = torch.randn(5, 3, dtype=torch.float64)
    _compare(tm, fm, x, torch.randn(4, 4, dtype=torch.float64), False, np.float64)


@pytest.mark.parametrize("bf", [False, True])
def test_gru_packed_sequence(bf, path):
    T, B, I, H = 6, 4, 3, 3
    tm, fm = _pair(I, H, 2, True, bf)
    lengths = torch.tensor([3, 6, 1, 3])
    g = torch.Generator().manual_seed(0)
    xp = torch.randn((B, T, I) if bf else (T, B, I), generator=g, dtype=torch.float64)
    h0 = torch.randn(4, B, H, generator=g, dtype=torch.float64)
    res = {}
    for name, m in (("torch", tm), ("fastrnn", fm)):
        x = xp.clone().requires_grad_(True)
        h = h0.clone().requires_grad_(True)
        out, hn = m(pack_padded_sequence(x, lengths, batch_first=bf,
                                         enforce_sorted=False), h)
        w = torch.randn(out.data.shape, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
        ((out.data * w).sum() + (hn * 3).sum()).backward()
        res[name] = (out, hn, x.grad, h.grad,
                     {n: p.grad for n, p in m.named_parameters()})
    (to, th, tx, tg0, tg), (fo, fh, fx, fg0, fg) = res["torch"], res["fastrnn"]
    assert torch.equal(fo.batch_sizes, to.batch_sizes)
    assert torch.equal(fo.unsorted_indices, to.unsorted_indices)
    _close(fo.data, to.data, np.float64, "packed output")
    _close(fh, th, np.float64, "h_n")
    _close(fx, tx, np.float64, "grad x")
    _close(fg0, tg0, np.float64, "grad h0")
    for k in tg:
        _close(fg[k], tg[k], np.float64, f"grad {k}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gru_cell(dtype):
    torch.manual_seed(0)
    td = TD[dtype]
    tm, fm = nn.GRUCell(3, 4, dtype=td), frt.GRUCell(3, 4, dtype=td)
    fm.load_state_dict(tm.state_dict())
    for shape in ((2,), ()):
        x = torch.randn(shape + (3,), dtype=td)
        for hx in (None, torch.randn(shape + (4,), dtype=td)):
            res = []
            for m in (tm, fm):
                for p in m.parameters():
                    p.grad = None
                xx = x.clone().requires_grad_(True)
                h = None if hx is None else hx.clone().requires_grad_(True)
                out = m(xx, h)
                (2 * out * out).sum().backward()
                res.append([out, xx.grad] + ([] if h is None else [h.grad])
                           + [p.grad for p in m.parameters()])
            for a, b in zip(res[1], res[0]):
                _close(a, b, dtype, f"GRU cell {shape} hx={hx is not None}")
    assert "GRUCell(3, 4" in repr(fm) and "nonlinearity" not in repr(fm)


def test_gru_gradcheck_and_opcheck():
    torch.manual_seed(0)
    fm = frt.GRU(2, 2, 2, bidirectional=True, dtype=torch.float64)
    names = [n for n, _ in fm.named_parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in fm.parameters()]
    assert torch.autograd.gradcheck(
        lambda x, h0, *ps: torch.func.functional_call(fm, dict(zip(names, ps)),
                                                      (x, h0)),
        (x, h0, *params))
    args = (x, params, h0, None, torch.tensor([3, 1]), "gru", 2, 2, 2, True,
            False, fm.backend, False)
    torch.library.opcheck(torch.ops.fastrnn.core_forward.default, args)


def _lm(cls, dropout=0.0):
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4, dtype=torch.float64)
            self.rnn = cls(4, 5, 2, batch_first=True, dtype=torch.float64,
                           dropout=dropout)
            self.out = nn.Linear(5, 7, dtype=torch.float64)

        def forward(self, ids):
            return self.out(self.rnn(self.emb(ids))[0])
    return LM()


def test_replace_gru_trains_like_torch():
    torch.manual_seed(0)
    ref, model = _lm(nn.GRU), _lm(nn.GRU)
    model.load_state_dict(ref.state_dict())
    assert frt.replace(model) is model and isinstance(model.rnn, frt.GRU)
    res = []
    for m in (ref, model):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(3)
        for _ in range(10):
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
    lone = frt.replace(nn.GRU(2, 3, bidirectional=True))
    assert isinstance(lone, frt.GRU) and lone.bidirectional
    kept = _lm(nn.GRU, dropout=0.5)
    with pytest.warns(UserWarning, match=r"rnn.*dropout"):
        frt.replace(kept)
    assert type(kept.rnn) is nn.GRU


def test_gru_unsupported_options():
    with pytest.raises(NotImplementedError, match="dropout"):
        frt.GRU(2, 3, 2, dropout=0.3)
    with pytest.raises(ValueError, match="identity"):
        frt.GRU(2, 3, init="identity")
    with pytest.raises(TypeError, match="h_0|hx"):
        frt.GRU(2, 3)(torch.randn(4, 1, 2), (torch.zeros(1, 1, 3),) * 2)
