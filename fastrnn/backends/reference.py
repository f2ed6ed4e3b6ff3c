"""The NumPy reference backend: plain, naive, readable. The oracle.

One Python loop per layer, per direction, per time step; named parameter
views; no fusion, no workspace, no cleverness. Every other backend is tested
against this module, and this module is tested against float64 central finite
differences (tests/test_reference_gradcheck.py).

Conventions shared with every backend (see fastrnn/backends/__init__.py):
  x        (T, B, I) float, or (T, B) int64 token ids
  lengths  (B,) int64 in [1, T]
  state0   (S, L*D, B, H): S = 1 (h) for the RNN and GRU, 2 (h, c) for the LSTM
  out      (T, B, D*H), zero at padding steps
Gate blocks are in PyTorch's order: (i, f, g, o) for the LSTM, (r, z, n)
for the GRU.
"""
import numpy as np

from .._spec import views

name = "numpy"


def available():
    return True, "always available (plain NumPy)"


# --------------------------------------------------------------------------
# activations: forward, and derivative from the saved output
# --------------------------------------------------------------------------
def _sigmoid(a):
    with np.errstate(over="ignore"):   # exp(-a) = inf for a << 0 gives 0: exact
        return 1.0 / (1.0 + np.exp(-a))


def _act(mode, a):
    if mode == "tanh":
        return np.tanh(a)
    if mode == "relu":
        return np.maximum(a, 0)
    if mode == "sigmoid":
        return _sigmoid(a)
    raise ValueError(mode)


def _dact(mode, h):
    """f'(a) expressed through h = f(a)."""
    if mode == "tanh":
        return 1 - h * h
    if mode == "relu":
        return (h > 0).astype(h.dtype)
    if mode == "sigmoid":
        return h * (1 - h)
    raise ValueError(mode)


def _layer_input_at(x_t, W_ih, tokens):
    """W_ih x_t for one time step: x_t (B, I) float, or (B,) ids -> column gather."""
    if tokens:
        return W_ih[:, x_t].T
    return x_t @ W_ih.T


# --------------------------------------------------------------------------
# core forward / backward
# --------------------------------------------------------------------------
def core_forward(spec, flat, x, lengths, state0, ctx=None):
    """Run the stacked (bi)directional core over the whole sequence.

    Returns out (T, B, D*H), state_n (S, L*D, B, H), cache for core_backward.
    """
    p = views(spec, flat)
    T, B = x.shape[0], x.shape[1]
    H, D, L = spec.H, spec.D, spec.L
    tokens = x.dtype.kind in "iu"
    dtype = flat.dtype
    state_n = np.zeros_like(state0)
    layer_in = x
    caches = []
    for k in range(L):
        layer_out = np.zeros((T, B, D * H), dtype=dtype)
        dir_caches = []
        for d in range(D):
            names = spec.names(k, d)
            W_ih, W_hh = p[names[0]], p[names[1]]
            zero_b = np.zeros(W_hh.shape[0], dtype)
            b_ih = p[names[2]] if spec.bias else zero_b
            b_hh = p[names[3]] if spec.bias else zero_b
            b = b_ih + b_hh
            h = state0[0, k * D + d].copy()
            c = state0[1, k * D + d].copy() if spec.mode == "lstm" else None
            steps = range(T) if d == 0 else range(T - 1, -1, -1)
            saved = []
            for t in steps:
                valid = (t < lengths)[:, None]
                if spec.mode == "gru":
                    # the recurrent n block is kept apart: r multiplies it
                    ax = _layer_input_at(layer_in[t], W_ih, tokens and k == 0) + b_ih
                    ah = h @ W_hh.T + b_hh
                    xr, xz, xn = np.split(ax, 3, axis=1)
                    hr, hz, hn = np.split(ah, 3, axis=1)
                    r = _sigmoid(xr + hr)
                    z = _sigmoid(xz + hz)
                    n = np.tanh(xn + r * hn)
                    h_new = (1 - z) * n + z * h
                    saved.append((t, h, hn, (r, z, n), h_new, valid))
                    h = np.where(valid, h_new, h)
                    layer_out[t, :, d * H:(d + 1) * H] = np.where(valid, h, 0)
                    continue
                a = (_layer_input_at(layer_in[t], W_ih, tokens and k == 0)
                     + h @ W_hh.T + b)
                if spec.mode == "lstm":
                    i, f, g, o = np.split(a, 4, axis=1)
                    i, f, g, o = _sigmoid(i), _sigmoid(f), np.tanh(g), _sigmoid(o)
                    c_new = f * c + i * g
                    h_new = o * np.tanh(c_new)
                    saved.append((t, h, c, (i, f, g, o), c_new, valid))
                    c = np.where(valid, c_new, c)
                else:
                    h_new = _act(spec.mode, a)
                    saved.append((t, h, None, None, h_new, valid))
                h = np.where(valid, h_new, h)
                layer_out[t, :, d * H:(d + 1) * H] = np.where(valid, h, 0)
            state_n[0, k * D + d] = h
            if c is not None:
                state_n[1, k * D + d] = c
            dir_caches.append(saved)
        caches.append((layer_in, dir_caches))
        layer_in = layer_out
    return layer_in, state_n, (caches, lengths, tokens)


def core_backward(spec, flat, cache, dout, dstate_n, state_clip=None, ctx=None,
                  dcs=None):
    """BPTT through the last core_forward.

    dout (T, B, D*H), dstate_n (S, L*D, B, H); dcs (LSTM only, optional)
    (T, B, D*H): dL/dc_t of the top layer at every step, as top_cells lays
    the cell states out (ignored at padding steps).
    Returns dx (None for token input), dstate0, grad (flat, core part filled),
    flow (T,): L2 norm of dL/dh_t of the top layer per step (valid rows,
    all directions), after state clipping when state_clip is given
    (gradient_flow itself never clips).
    """
    caches, lengths, tokens = cache
    p = views(spec, flat)
    grad = np.zeros_like(flat)
    g = views(spec, grad)
    H, D, L = spec.H, spec.D, spec.L
    T = dout.shape[0]
    dstate0 = np.zeros_like(dstate_n)
    flow2 = np.zeros(T, dtype=np.float64)
    d_layer_out = dout
    for k in range(L - 1, -1, -1):
        layer_in, dir_caches = caches[k]
        tok = tokens and k == 0
        d_layer_in = None if tok else np.zeros(layer_in.shape, dtype=flat.dtype)
        for d in range(D):
            names = spec.names(k, d)
            W_ih, W_hh = p[names[0]], p[names[1]]
            dh = dstate_n[0, k * D + d].copy()
            dc = dstate_n[1, k * D + d].copy() if spec.mode == "lstm" else None
            for (t, h_prev, c_prev, gates, new, valid) in reversed(dir_caches[d]):
                dh = dh + np.where(valid, d_layer_out[t, :, d * H:(d + 1) * H], 0)
                if state_clip is not None:
                    dh = np.where(valid, np.clip(dh, -state_clip, state_clip), dh)
                if k == L - 1:
                    flow2[t] += np.sum(np.where(valid, dh, 0).astype(np.float64) ** 2)
                if spec.mode == "lstm":
                    if dcs is not None and k == L - 1:
                        dc = dc + np.where(valid, dcs[t, :, d * H:(d + 1) * H], 0)
                    i, f, gg, o = gates
                    tc = np.tanh(new)
                    do = dh * tc
                    dct = dc + dh * o * (1 - tc * tc)
                    da = np.concatenate([dct * gg * i * (1 - i),
                                         dct * c_prev * f * (1 - f),
                                         dct * i * (1 - gg * gg),
                                         do * o * (1 - o)], axis=1)
                    da = np.where(valid, da, 0)
                    dc = np.where(valid, dct * f, dc)
                elif spec.mode == "gru":
                    # h' = (1 - z) n + z h: the input side gets (dr, dz, dn)
                    # at the pre-activations, the recurrent side (dr, dz, r dn)
                    r, z, n = gates
                    hn = c_prev              # W_hn h + b_hn, saved by the forward
                    dn = dh * (1 - z) * (1 - n * n)
                    dz = dh * (h_prev - n) * z * (1 - z)
                    dr = dn * hn * r * (1 - r)
                    da = np.where(valid, np.concatenate([dr, dz, dn], axis=1), 0)
                    dah = np.where(valid, np.concatenate([dr, dz, dn * r], axis=1), 0)
                else:
                    da = np.where(valid, _dact(spec.mode, new) * dh, 0)
                if spec.mode != "gru":
                    dah = da                 # one pre-activation for both sides
                # parameter gradients: sums over time of per-step gradients
                if tok:
                    np.add.at(g[names[0]].T, layer_in[t], da)
                else:
                    g[names[0]] += da.T @ layer_in[t]
                    d_layer_in[t] += da @ W_ih
                g[names[1]] += dah.T @ h_prev
                if spec.bias:
                    g[names[2]] += da.sum(axis=0)
                    g[names[3]] += dah.sum(axis=0)
                direct = dh * gates[1] if spec.mode == "gru" else 0
                dh = np.where(valid, dah @ W_hh + direct, dh)
            dstate0[0, k * D + d] = dh
            if dc is not None:
                dstate0[1, k * D + d] = dc
        d_layer_out = d_layer_in
    return d_layer_out, dstate0, grad, np.sqrt(flow2)


def top_cells(spec, cache):
    """The top layer's cell states c_t of the LSTM forward that made `cache`:
    (T, B, D*H) laid out like `out`, zero at padding steps."""
    caches, lengths, _ = cache
    H = spec.H
    first = caches[-1][1][0]
    T, B = len(first), first[0][4].shape[0]
    cs = np.zeros((T, B, spec.D * H), dtype=first[0][4].dtype)
    for d, saved in enumerate(caches[-1][1]):
        for (t, _, _, _, c_new, valid) in saved:
            cs[t, :, d * H:(d + 1) * H] = np.where(valid, c_new, 0)
    return cs


# --------------------------------------------------------------------------
# read-out and loss
# --------------------------------------------------------------------------
def readout_forward(spec, flat, top, lengths):
    """Linear read-out: (T, B, O) for readout 'all' (zero at padding steps),
    (B, O) for 'last' (from each sequence's last valid step)."""
    p = views(spec, flat)
    W, b = p["weight_out"], p["bias_out"]
    B = top.shape[1]
    if spec.readout == "last":
        return top[lengths - 1, np.arange(B)] @ W.T + b
    T = top.shape[0]
    valid = (np.arange(T)[:, None] < lengths[None, :])[:, :, None]
    return np.where(valid, top @ W.T + b, 0)


def readout_loss(spec, flat, top, lengths, y):
    """Loss (sum over steps, mean over batch), d top, and read-out grads.

    Returns loss (float), dtop (T, B, D*H), z, gW_out, gb_out.
    """
    p = views(spec, flat)
    W = p["weight_out"]
    T, B = top.shape[0], top.shape[1]
    z = readout_forward(spec, flat, top, lengths)
    if spec.readout == "last":
        valid = np.ones((B,), dtype=bool)
        h = top[lengths - 1, np.arange(B)]
    else:
        valid = np.arange(T)[:, None] < lengths[None, :]
        h = top
    if spec.loss == "cross_entropy":
        m = z.max(axis=-1, keepdims=True)
        e = np.exp(z - m)
        s = e.sum(axis=-1, keepdims=True)
        logp = z - m - np.log(s)
        nll = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        dz = e / s
        np.put_along_axis(dz, y[..., None],
                          np.take_along_axis(dz, y[..., None], axis=-1) - 1, axis=-1)
    else:
        diff = z - y
        nll = (diff * diff).mean(axis=-1)
        dz = 2 * diff / spec.O
    nll = np.where(valid, nll, 0)
    dz = np.where(valid[..., None], dz, 0) / B
    loss = float(np.sum(nll.astype(np.float64)) / B)
    gW = dz.reshape(-1, spec.O).T @ h.reshape(-1, h.shape[-1])
    gb = dz.reshape(-1, spec.O).sum(axis=0)
    dh = dz @ W
    if spec.readout == "last":
        dtop = np.zeros_like(top)
        dtop[lengths - 1, np.arange(B)] = dh
    else:
        dtop = dh
    return loss, dtop, z, gW, gb


# --------------------------------------------------------------------------
# clipping and optimizers on the flat gradient
# --------------------------------------------------------------------------
def clip_and_update(grad, params, opt_state, step, *, opt, hyper, clip, limit):
    """Clip grad (in place) and apply one optimizer update to params.

    opt: "sgd" | "adam" | "adagrad"; hyper: dict of the optimizer's numbers;
    clip: None | "norm" | "value"; opt_state (2, P) moments; step: the
    update's 1-based count. Returns (grad_norm, clipped). IEEE arithmetic
    throughout: 0/0 is NaN, overflow inf (train_step checks the result).
    """
    with np.errstate(all="ignore"):
        return _clip_and_update(grad, params, opt_state, step, opt=opt, hyper=hyper,
                                clip=clip, limit=limit)


def _clip_and_update(grad, params, opt_state, step, *, opt, hyper, clip, limit):
    gnorm = float(np.sqrt(np.sum(grad.astype(np.float64) ** 2)))
    clipped = False
    if clip == "norm" and gnorm > limit:
        grad *= grad.dtype.type(limit / gnorm)
        clipped = True
    elif clip == "value":
        clipped = bool(np.any(np.abs(grad) > limit))
        np.clip(grad, -limit, limit, out=grad)
    m, v = opt_state[0], opt_state[1]
    lr = hyper["lr"]
    if opt == "sgd":
        mu = hyper["momentum"]
        if mu != 0:
            m[:] = mu * m + grad      # PyTorch: buf = mu*buf + g (buf = g at step 1)
            params -= lr * m
        else:
            params -= lr * grad
    elif opt == "adam":
        b1, b2, eps = hyper["beta1"], hyper["beta2"], hyper["eps"]
        m[:] = b1 * m + (1 - b1) * grad
        v[:] = b2 * v + (1 - b2) * grad * grad
        bc1 = 1 - b1 ** step
        bc2 = 1 - b2 ** step
        denom = np.sqrt(v) / np.sqrt(bc2) + eps
        params -= (lr / bc1) * m / denom
    elif opt == "adagrad":
        eps = hyper["eps"]
        m[:] = m + grad * grad
        params -= lr * grad / (np.sqrt(m) + eps)
    else:
        raise ValueError(opt)
    return gnorm, clipped


# --------------------------------------------------------------------------
# model-level entry points (same functions in every backend)
# --------------------------------------------------------------------------
def model_forward(spec, flat, x, lengths, state0, ctx=None):
    top, state_n, _ = core_forward(spec, flat, x, lengths, state0)
    return readout_forward(spec, flat, top, lengths), state_n


def loss_and_grad(spec, flat, x, lengths, state0, y, state_clip=None):
    """Forward, loss and BPTT. Returns loss, grad (flat), state_n, flow."""
    top, state_n, cache = core_forward(spec, flat, x, lengths, state0)
    loss, dtop, _, gW, gb = readout_loss(spec, flat, top, lengths, y)
    _, _, grad, flow = core_backward(spec, flat, cache, dtop,
                                     np.zeros_like(state_n), state_clip)
    g = views(spec, grad)
    g["weight_out"][...] = gW
    g["bias_out"][...] = gb
    return loss, grad, state_n, flow


def train_step(spec, flat, opt_state, step, x, lengths, state0, y, *,
               opt, hyper, clip, limit, state_clip, ctx=None):
    """One training step. Updates flat/opt_state in place unless the loss or
    gradient is not finite, or the update would make a parameter or moment
    non-finite (the update is computed on copies and applied whole or not at
    all). Returns dict(loss, grad_norm, clipped, skipped, state_n, grad)."""
    r = train_grad(spec, flat, x, lengths, state0, y, state_clip=state_clip)
    u = apply_update(spec, flat, opt_state, step, r["grad"], r["loss"], opt=opt,
                     hyper=hyper, clip=clip, limit=limit)
    return dict(u, loss=r["loss"], state_n=r["state_n"])


def train_grad(spec, flat, x, lengths, state0, y, *, state_clip, ctx=None):
    """The first half of train_step: forward, loss and BPTT, nothing updated.
    Returns dict(loss, grad (flat, a fresh array), state_n)."""
    loss, grad, state_n, _ = loss_and_grad(spec, flat, x, lengths, state0, y,
                                           state_clip)
    return dict(loss=loss, grad=grad, state_n=state_n)


def apply_update(spec, flat, opt_state, step, grad, loss, *, opt, hyper, clip,
                 limit, ctx=None):
    """The second half of train_step: the norm of grad, the non-finite guard
    (on loss and norm), clipping (grad is clipped in place) and the update of
    flat/opt_state in place. Returns dict(grad_norm, clipped, skipped, grad)."""
    gnorm = float(np.sqrt(np.sum(grad.astype(np.float64) ** 2)))
    if not (np.isfinite(loss) and np.isfinite(gnorm)):
        return dict(grad_norm=gnorm, clipped=False, skipped=True, grad=grad)
    new_params = flat.copy()
    new_state = opt_state.copy()
    g = grad.copy()
    gnorm, clipped = clip_and_update(g, new_params, new_state, step, opt=opt,
                                     hyper=hyper, clip=clip, limit=limit)
    rows = {"sgd": 1 if hyper.get("momentum", 0) else 0, "adam": 2, "adagrad": 1}[opt]
    if not (np.all(np.isfinite(new_params)) and np.all(np.isfinite(new_state[:rows]))):
        return dict(grad_norm=gnorm, clipped=False, skipped=True, grad=grad)
    flat[:] = new_params
    opt_state[:] = new_state
    grad[:] = g
    return dict(grad_norm=gnorm, clipped=clipped, skipped=False, grad=grad)


def gradient_flow(spec, flat, x, lengths, state0, y, ctx=None):
    return loss_and_grad(spec, flat, x, lengths, state0, y)[3]
