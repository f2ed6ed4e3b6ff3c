"""Helpers shared by the PyTorch-oracle tests (test_torch_rnn.py,
test_torch_lstm.py): the conversions, the optimizer pairs, the data and
the fused-TrainStep-against-torch training run. Import only after
``pytest.importorskip("torch")``."""
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn as fr
from conftest import assert_close

F64 = np.float64
TORCH_DTYPE = {np.dtype(np.float32): torch.float32,
               np.dtype(np.float64): torch.float64}
READOUT_KEYS = ("weight_out", "bias_out")


def _t(a, grad=False):
    """A torch tensor holding a copy of the NumPy array ``a``."""
    t = torch.tensor(np.array(a))
    return t.requires_grad_(True) if grad else t


def _np(t):
    return t.detach().cpu().numpy()


def _check_param_grads(layer, tm, dtype, what=""):
    names = [n for n, _ in tm.named_parameters()]
    assert sorted(layer.grads) == sorted(names), "layer.grads keys"
    for name, p in tm.named_parameters():
        assert_close(layer.grads[name], _np(p.grad), dtype,
                     f"{what} grad {name}")


def _make_optimizers(spec, params):
    """(fastrnn optimizer, torch optimizer) for the same rule and settings."""
    kind, kw = spec
    if kind == "sgd":
        return fr.SGD(kw["lr"], momentum=kw["momentum"]), torch.optim.SGD(
            params, lr=kw["lr"], momentum=kw["momentum"])
    if kind == "adam":
        return fr.Adam(kw["lr"]), torch.optim.Adam(params, lr=kw["lr"])
    if kind == "adagrad":
        # fr.Adagrad's documented default eps is 1e-8 (torch's is 1e-10)
        return fr.Adagrad(kw["lr"]), torch.optim.Adagrad(
            params, lr=kw["lr"], eps=1e-8)
    raise AssertionError(kind)


def _make_data(rng, T, B, I, O, loss, readout, steps):
    xs = [rng.standard_normal((T, B, I)) for _ in range(steps)]
    if loss == "cross_entropy":
        shape = (T, B) if readout == "all" else (B,)
        ys = [rng.integers(0, O, size=shape) for _ in range(steps)]
    else:
        shape = (T, B, O) if readout == "all" else (B, O)
        ys = [rng.standard_normal(shape) for _ in range(steps)]
    return xs, ys


def _grad_norm(params):
    return float(torch.sqrt(sum((p.grad ** 2).sum() for p in params)))


def _compare_params(model, tmodel, what):
    sd = model.state_dict()
    names = [n for n, _ in tmodel.named_parameters()]
    assert sorted(sd) == sorted(names), "model.state_dict() keys"
    for name, p in tmodel.named_parameters():
        assert_close(sd[name], _np(p), F64, f"{what}: {name}")


def unrolled(params, x, num_layers, mode, bidirectional, hx=None,
             state_clip=None, clamp_log=None, c_log=None, top_hs=None):
    """Time-major LSTM (mode "lstm") or Elman RNN (mode "tanh"/"relu"/
    "sigmoid") unrolled step by step in torch.

    params: name -> tensor, torch's names (bias keys optional). hx: None,
    h0 (RNN) or (h0, c0) (LSTM), PyTorch's shapes.

    With ``state_clip=c`` every hidden state h_t (of every layer and
    direction) gets a hook that clamps dL/dh_t -- the total gradient reaching
    h_t: from the layer above / the output at t and from step t+1 -- element-
    wise to [-c, c] before it propagates further back; whether a hook really
    clamped something is appended to ``clamp_log``. The LSTM's cell states
    c_t are never clamped; with ``c_log`` given, whether |dL/dc_t| > c
    somewhere is appended to it (to show that clamping c too would matter).

    With ``top_hs`` (a list) given, the top layer's h_t of every direction
    get retain_grad() and top_hs[d][t] is that tensor.
    Returns (out (T, B, D*H), h_n or (h_n, c_n)).
    """
    lstm = mode == "lstm"
    act = {"tanh": torch.tanh, "relu": torch.relu,
           "sigmoid": torch.sigmoid}.get(mode)
    T, B = x.shape[0], x.shape[1]
    D = 2 if bidirectional else 1
    H = params["weight_hh_l0"].shape[1]
    h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)

    def clamp(g, c=state_clip):
        if clamp_log is not None:
            clamp_log.append(bool((g.abs() > c).any()))
        return g.clamp(-c, c)

    def log_c(g, c=state_clip):
        c_log.append(bool((g.abs() > c).any()))

    inp, finals_h, finals_c = x, [], []
    for k in range(num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            W_ih, W_hh = params["weight_ih" + sfx], params["weight_hh" + sfx]
            b_ih = params.get("bias_ih" + sfx)
            b_hh = params.get("bias_hh" + sfx)
            h = (h0[k * D + d] if h0 is not None
                 else torch.zeros(B, H, dtype=x.dtype))
            c = (c0[k * D + d] if c0 is not None
                 else torch.zeros(B, H, dtype=x.dtype))
            hs = [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                a = inp[t] @ W_ih.T + h @ W_hh.T
                if b_ih is not None:
                    a = a + b_ih + b_hh
                if lstm:
                    i_g, f_g, g_g, o_g = a.chunk(4, dim=-1)
                    c = (torch.sigmoid(f_g) * c
                         + torch.sigmoid(i_g) * torch.tanh(g_g))
                    if state_clip is not None and c_log is not None:
                        c.register_hook(log_c)
                    h = torch.sigmoid(o_g) * torch.tanh(c)
                else:
                    h = act(a)
                if state_clip is not None:
                    h.register_hook(clamp)
                if top_hs is not None and k == num_layers - 1:
                    h.retain_grad()
                hs[t] = h
            outs.append(torch.stack(hs))
            if top_hs is not None and k == num_layers - 1:
                top_hs.append(hs)
            finals_h.append(h)
            finals_c.append(c)
        inp = torch.cat(outs, -1)
    if lstm:
        return inp, (torch.stack(finals_h), torch.stack(finals_c))
    return inp, torch.stack(finals_h)


class TorchModel:
    """torch twin of an fr.SequenceModel (LSTM, GRU or RNN core), loaded from
    model.state_dict(); double precision. ``mode`` is "lstm", "gru" or the
    RNN's nonlinearity. The core runs as ``unrolled`` for "sigmoid" (nn.RNN has
    none) and whenever ``run_core`` gets keywords for it."""

    def __init__(self, model_sd, I, H, O, num_layers, mode, bias,
                 bidirectional, loss, readout):
        D = 2 if bidirectional else 1
        if mode in ("lstm", "gru"):
            cls = torch.nn.LSTM if mode == "lstm" else torch.nn.GRU
            self.core = cls(I, H, num_layers=num_layers, bias=bias,
                            bidirectional=bidirectional).double()
        else:
            # nn.RNN has no sigmoid: it then only holds the parameters
            self.core = torch.nn.RNN(
                I, H, num_layers=num_layers,
                nonlinearity="tanh" if mode == "sigmoid" else mode,
                bias=bias, bidirectional=bidirectional).double()
        self.core.load_state_dict({k: _t(v) for k, v in model_sd.items()
                                   if k not in READOUT_KEYS})
        self.lin = torch.nn.Linear(D * H, O).double()
        with torch.no_grad():
            self.lin.weight.copy_(_t(model_sd["weight_out"]))
            self.lin.bias.copy_(_t(model_sd["bias_out"]))
        self.num_layers, self.mode = num_layers, mode
        self.bidirectional = bidirectional
        self.loss, self.readout = loss, readout

    def named_parameters(self):
        yield from self.core.named_parameters()
        yield "weight_out", self.lin.weight
        yield "bias_out", self.lin.bias

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def _hx(self, hx):
        if hx is None:
            return None
        if self.mode == "lstm":
            return (_t(hx[0]), _t(hx[1]))
        return _t(hx)

    def run_core(self, x, hx=None, lengths=None, **kw):
        """Core outputs (T, B, D*H) (zero at padding) and the final state;
        unrolled by hand (``unrolled``) when keywords for it are given."""
        xt, hxt = _t(x), self._hx(hx)
        if kw or self.mode == "sigmoid":
            assert lengths is None
            params = dict(self.core.named_parameters())
            return unrolled(params, xt, self.num_layers, self.mode,
                            self.bidirectional, hx=hxt, **kw)
        if lengths is None:
            return self.core(xt, hxt)
        packed = pack_padded_sequence(xt, torch.as_tensor(lengths),
                                      enforce_sorted=False)
        out_p, hn = self.core(packed, hxt)
        out, _ = pad_packed_sequence(out_p, total_length=x.shape[0])
        return out, hn

    def forward(self, x, hx=None, lengths=None, **kw):
        out, hn = self.run_core(x, hx, lengths, **kw)
        T, B = x.shape[0], x.shape[1]
        if self.readout == "all":
            return self.lin(out), hn
        last = (np.full(B, T - 1) if lengths is None
                else np.asarray(lengths) - 1)
        return self.lin(out[torch.as_tensor(last), torch.arange(B)]), hn

    def loss_fn(self, x, y, hx=None, lengths=None, **kw):
        """Sum over time steps, mean over the batch; also the final state."""
        z, hn = self.forward(x, hx, lengths, **kw)
        T, B = x.shape[0], x.shape[1]
        yt = _t(y)
        if self.readout == "last":
            if self.loss == "cross_entropy":
                L = F.cross_entropy(z, yt, reduction="sum") / B
            else:
                L = ((z - yt) ** 2).mean(-1).sum() / B
            return L, hn
        O = z.shape[-1]
        if lengths is None:
            if self.loss == "cross_entropy":
                L = F.cross_entropy(z.reshape(-1, O), yt.reshape(-1),
                                    reduction="sum") / B
            else:
                L = ((z - yt) ** 2).mean(-1).sum() / B
            return L, hn
        mask = _t((np.arange(T)[:, None] < np.asarray(lengths)[None, :])
                  .astype(F64))
        if self.loss == "cross_entropy":
            per = F.cross_entropy(z.reshape(-1, O), yt.reshape(-1),
                                  reduction="none").reshape(T, B)
        else:
            per = ((z - yt) ** 2).mean(-1)
        return (per * mask).sum() / B, hn


def train_and_compare(model, tmodel, rng, *, opt_spec, clip=None,
                      loss="cross_entropy", readout="all", lengths=None,
                      make_hx=None, compare_state, steps=3, T=5, B=3, I=3,
                      O=3):
    """Run ``steps`` fused TrainSteps of ``model`` and the same steps in the
    torch model ``tmodel`` (its ``forward`` and ``loss_fn``); compare the
    outputs and final state of a forward call, then loss, grad_norm,
    clipped and hx at every step, parameters at the end.

    ``rng`` draws the data, then the initial state ``make_hx(rng)`` (None:
    zeros). ``compare_state(got, torch_state, what)`` compares a final state.
    ``clip`` is None, "norm" or "value"; its threshold is set from the
    gradient at the initial parameters so that clipping really happens."""
    params = tmodel.parameters()
    xs, ys = _make_data(rng, T, B, I, O, loss, readout, steps)
    hx = make_hx(rng) if make_hx is not None else None

    # forward only, at the initial parameters
    z, hn = model(xs[0], hx=hx, lengths=lengths)
    with torch.no_grad():
        z_t, hn_t = tmodel.forward(xs[0], hx, lengths)
    z_t = _np(z_t)
    if lengths is not None and readout == "all":
        # what the model reports at padding steps is not specified
        valid = np.arange(T)[:, None] < np.asarray(lengths)[None, :]
        z, z_t = z[valid], z_t[valid]
    assert_close(z, z_t, F64, "model outputs")
    compare_state(hn, hn_t, "model final state")

    fr_clip = None
    if clip is not None:
        L, _ = tmodel.loss_fn(xs[0], ys[0], hx, lengths)
        L.backward()
        if clip == "norm":
            max_norm = 0.7 * _grad_norm(params)
            fr_clip = fr.ClipNorm(max_norm)
        else:
            limit = 0.5 * max(float(p.grad.abs().max()) for p in params)
            fr_clip = fr.ClipValue(limit)
        for p in params:
            p.grad = None
    fr_opt, t_opt = _make_optimizers(opt_spec, params)
    step = fr.TrainStep(model, fr_opt, clip=fr_clip)

    clipped_any = False
    for k in range(steps):
        res = step(xs[k], ys[k], hx=hx, lengths=lengths)
        t_opt.zero_grad()
        L, hn_t = tmodel.loss_fn(xs[k], ys[k], hx, lengths)
        L.backward()
        g = _grad_norm(params)
        clipped = False
        if clip == "norm" and g > max_norm:
            clipped = True
            with torch.no_grad():
                for p in params:
                    p.grad.mul_(max_norm / g)
        elif clip == "value":
            clipped = any(bool((p.grad.abs() > limit).any()) for p in params)
            torch.nn.utils.clip_grad_value_(params, limit)
        t_opt.step()
        clipped_any |= clipped

        assert_close(res.loss, L.item(), F64, f"step {k}: loss")
        assert_close(res.grad_norm, g, F64, f"step {k}: grad_norm")
        assert bool(res.clipped) == clipped, f"step {k}: clipped"
        assert not res.skipped, f"step {k}: skipped"
        compare_state(res.hx, hn_t, f"step {k}: hx")
    if clip is not None:
        assert clipped_any, "test setup: clipping never happened"
    _compare_params(model, tmodel, f"after {steps} steps")
