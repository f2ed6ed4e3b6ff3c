"""C backend: fused cell updates in C (csrc/, built by cffi as
fastrnn._cfused), the large matrix products in NumPy's BLAS.

Design (see DESIGN.md; the same functions as backends/reference.py):
- Parameters are the caller's flat buffer; per caller (``ctx``) a workspace
  keyed on (spec, T, B, token input, dtype) holds every array, the C
  structs that point into it, and the views of the Python loops, so a
  steady training loop allocates almost nothing.
- Outside the time loop NumPy (BLAS) does the products over all T*B rows at
  once: the input projection W_ih x (a row gather of W_ih^T for token ids),
  dW_ih and dW_hh (one product each over the stored deltas), the input
  gradient, the read-out and its gradients.
- The time loop of one direction of one layer is one C call
  (``fr_forward_*`` / ``fr_backward_*``): per step the recurrent product by
  explicit register-tiled loops, the biases, then the fused pointwise
  update (activation, LSTM cell update, GRU gates, masked state carry for
  ``lengths``, state clipping of dL/dh, gradient flow). Derivatives come
  from the saved activations.
- When the per-step product is large (B*H*G*H > SMALL_MACS multiply-adds)
  BLAS beats the explicit loops by more than the per-step overhead of
  Python, and a Python loop calls np.matmul and then the same C kernel for
  that one step (the kernel takes the product as an argument).
- The GRU keeps the recurrent product W_hh h_{t-1} + b_hh apart from
  W_ih x_t + b_ih (r multiplies its n block, as in PyTorch), so its
  backward has two sets of deltas: the input side (for dW_ih, db_ih, dx)
  and the recurrent side (for dW_hh, db_hh and dL/dh_{t-1}).
- Loss (softmax cross-entropy or mse), the global norm, the non-finite
  guard, ClipNorm/ClipValue and the SGD/Adam/Adagrad update are one C call
  each. float32 activations use a vectorised exponential (within 2 ulps of
  NumPy); float64 uses libm.
- Token ids and class ids are bounds-checked here (after the layers'
  validation) and again in C, so no kernel indexes out of bounds.

Why the time loop is in C. Measured on the 2-core dev machine (AMD EPYC,
float32, T=100, forward + backward of one layer, single-threaded BLAS,
microseconds per training step):

    cell  B   H   | C time loop | Python loop, one C call | Python loop,
                  |             | per step (same kernels) | np.matmul + C per step
    rnn   1   32  |      19     |      77                 |     403
    rnn   16  32  |     224     |     284                 |     654
    rnn   16  128 |    1807     |    1873                 |    2381
    rnn   64  128 |    7471     |    7532                 |    6773
    lstm  1   128 |     700     |     782                 |    1317
    lstm  64  128 |   31864     |   31934                 |   27698

A cffi call costs ~0.3 us, so a Python loop around one C call per step
adds ~60 us per layer and direction (x 2T calls): +45% on the whole
training step at B=1, H=32 (~130 us), where Numba's step is ~150 us. With
np.matmul in the loop it is ~2 us per step, which only pays off once the
product itself takes tens of microseconds: BLAS wins from about 1M
multiply-adds per step (B=64, H=128 RNN) and by 1.5x at 4M and more
(H=512), hence SMALL_MACS = 2^20.
"""
import functools
import os

import numpy as np

from . import ctx_state

name = "c"

try:  # the extension is optional: a machine without a compiler lacks it
    from .. import _cfused
    ffi, lib = _cfused.ffi, _cfused.lib
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the install
    ffi = lib = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

# per-step recurrent products (B*H*G*H multiply-adds) up to this size run as
# explicit loops inside the C time loop; larger ones as one np.matmul (BLAS)
# per step from a Python loop (see the module docstring)
SMALL_MACS = 1 << 20

_MODES = {"tanh": 0, "relu": 1, "sigmoid": 2, "lstm": 3, "gru": 4}
_OPTS = {"sgd": 0, "adam": 1, "adagrad": 2}
_CLIPS = {None: 0, "norm": 1, "value": 2}


def _build_failure():
    """The reason recorded by setup.py when the build failed, if any."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "_cfused_build_error.txt")
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def available():
    if lib is None:
        why = _build_failure()
        detail = f"the build failed: {why}" if why else _IMPORT_ERROR
        return False, ("the C extension fastrnn._cfused was not built: "
                       f"{detail} (reinstall fastrnn where a C compiler is "
                       "available to build it)")
    clones = " with AVX2+FMA dispatch" if lib.fr_has_clones() else ""
    return True, f"C extension fastrnn._cfused (cffi){clones}"


# ============================================================================
# the per-caller workspace
# ============================================================================
class _Work:
    """Arrays, C structs and views for one (spec, T, B, tokens, dtype)."""

    def __init__(self, spec, T, B, tok, dtype):
        self.key = (spec, T, B, tok, dtype)
        H, L, D = spec.H, spec.L, spec.D
        lstm, gru = spec.mode == "lstm", spec.mode == "gru"
        G = spec.G
        GH, DH = G * H, D * H
        self.T, self.B, self.H, self.L, self.D, self.G = T, B, H, L, D, G
        self.lstm, self.gru, self.tok = lstm, gru, tok
        self.sfx = "f32" if dtype == np.float32 else "f64"
        self.ctype = "float" if dtype == np.float32 else "double"
        self.fwd = getattr(lib, "fr_forward_" + self.sfx)
        self.bwd = getattr(lib, "fr_backward_" + self.sfx)
        self.small = B * H * GH <= SMALL_MACS
        nl = L * D if lstm else 0
        ng = L * D if (lstm or gru) else 0
        e = np.empty
        self.HX = np.zeros((L * D, T + 2, B, H), dtype)
        self.CX = np.zeros((nl, T + 2, B, H), dtype)
        self.GATES = e((ng, T, B, GH), dtype)
        self.TC = e((nl, T, B, H), dtype)
        self.HN = e((L * D if gru else 0, T, B, H), dtype)
        self.LOUT = e((L, T, B, DH), dtype)
        self.DELTA = e((T, B, GH), dtype)
        # the deltas W_hh multiplies: the GRU's own recurrent side, else DELTA
        self.DELTAH = e((T, B, GH), dtype) if gru else self.DELTA
        self.DIN = e((2 if L > 1 else 0, T * B * DH), dtype)  # d input, layers > 0
        self.DTOP = np.zeros((T, B, DH), dtype)   # gradient of the top output
        self.DH = np.zeros((2, B, H), dtype)      # dh, dc carried back
        self.SCR = e((B, GH), dtype)
        self.PROD = e((B * max(GH, H),), dtype)   # per-step BLAS product
        self.WT = e((H, GH), dtype)               # W_hh^T for the C loop
        self.WIT = e((spec.I, GH) if tok else (0,), dtype)   # W_ih^T for ids
        self.len = np.zeros(B, np.int64)
        S = 2 if lstm else 1
        self.zstate = np.zeros((S, L * D, B, H), dtype)   # dL/dstate_n = 0
        self.dstate0 = np.zeros((S, L * D, B, H), dtype)  # unused by training
        self.flow = np.zeros(T, np.float64)
        self.grad = np.zeros(spec._n_total, dtype)
        R = T * B if spec.readout == "all" else B
        O = max(spec.O, 1)
        self.Z = e((R, O), dtype)
        self.DZ = e((R, O), dtype)
        self.HLAST = e((B, DH), dtype)
        self.ar = np.arange(B)
        self.slices = _param_slices(spec)
        self.gviews = _views(self.slices, self.grad)
        off, shape = spec.layout.get("weight_out", (0, (0, 0)))
        self.out_slice = (off, shape, spec.layout.get("bias_out", (0,))[0])
        self.flat = None
        # C pointers into the workspace
        p = self._ptr
        self.lenp, self.flowp = ffi.from_buffer("int64_t[]", self.len), \
            ffi.from_buffer("double[]", self.flow)
        self.PRODp = p(self.PROD)
        self.Zp, self.DZp = p(self.Z), p(self.DZ)
        self.fq, self.bq = [], []
        HXp, CXp, GAp, TCp, LOp = p(self.HX), p(self.CX), p(self.GATES), \
            p(self.TC), p(self.LOUT)
        HNp = p(self.HN)
        DTOPp, DINp = p(self.DTOP), p(self.DIN)
        for k in range(L):
            for d in range(D):
                kd = k * D + d
                fq = ffi.new(f"fr_seq_{self.sfx} *")
                self._dims(fq.d, spec, d)
                fq.W = p(self.WT)
                fq.HX = HXp + kd * (T + 2) * B * H
                if lstm:
                    fq.CX = CXp + kd * (T + 2) * B * H
                    fq.GATES = GAp + kd * T * B * GH
                    fq.TC = TCp + kd * T * B * H
                if gru:
                    fq.GATES = GAp + kd * T * B * GH
                    fq.HN = HNp + kd * T * B * H
                fq.out = LOp + k * T * B * DH + d * H
                fq.scratch = p(self.SCR)
                bq = ffi.new(f"fr_seq_{self.sfx} *")
                bq[0] = fq[0]
                # the gradient of this layer's output: DTOP for the top
                # layer, else the input gradient of the layer above
                if k == L - 1:
                    bq.out = DTOPp + d * H
                else:
                    j = (L - 2 - k) % 2
                    bq.out = DINp + j * T * B * DH + d * H
                bq.DELTA = p(self.DELTA)
                bq.DELTAH = p(self.DELTAH)
                bq.dh = p(self.DH[0])
                bq.dc = p(self.DH[1])
                self.fq.append(fq)
                self.bq.append(bq)
        # views for the Python loops of the BLAS path
        self.hrows = [list(self.HX[kd]) for kd in range(L * D)]
        self.drows = list(self.DELTAH)
        self.prod_f = self.PROD[:B * GH].reshape(B, GH)
        self.prod_b = self.PROD[:B * H].reshape(B, H)
        self.la = ffi.new("fr_loss_args *")
        self.la.R, self.la.O, self.la.B = R, O, B
        self.la.kind = 1 if spec.loss == "mse" else 0
        self.la.all_valid = int(spec.readout == "last")
        self.la.lengths = self.lenp
        self.ua = ffi.new("fr_update_args *")

    def _ptr(self, a):
        return ffi.from_buffer(self.ctype + "[]", a)

    def _dims(self, dm, spec, d):
        dm.T, dm.B, dm.H = self.T, self.B, self.H
        dm.mode = _MODES[spec.mode]
        dm.rev = d
        dm.ldo = self.D * self.H
        dm.lengths = self.lenp
        dm.flow = self.flowp

    def bind(self, flat):
        """Parameter views of flat and the C pointers of W_hh, cached while
        the caller passes the same buffer."""
        if self.flat is not flat:
            self.views = _views(self.slices, flat)
            fp = self.flat_p = ffi.from_buffer(self.ctype + "[]", flat)
            self.whh_p = [fp + sl[1][0] for sl in self.slices]
            for fq, sl in zip(self.fq, self.slices):
                if sl[2] is not None:      # biases, added inside the time loop
                    fq.b_ih, fq.b_hh = fp + sl[2][0], fp + sl[3][0]
            off, shape, boff = self.out_slice
            self.W_out = flat[off:off + shape[0] * shape[1]].reshape(shape)
            self.flat = flat
        return self.views

    def din(self, k):
        """Gradient buffer of layer k's input, (T*B, D*H) (k > 0)."""
        return self.DIN[(self.L - 1 - k) % 2].reshape(self.T * self.B, -1)


def _work(ctx, spec, flat, T, B, tok):
    key = (spec, T, B, tok, flat.dtype)
    if ctx is None:
        return _Work(spec, T, B, tok, flat.dtype)
    w = ctx.get("c")
    if w is None or w.key != key:
        w = ctx["c"] = _Work(spec, T, B, tok, flat.dtype)
    return w


def _param_slices(spec):
    """Per layer/direction: (offset, shape) of W_ih, W_hh, b_ih, b_hh
    (None without bias)."""
    out = []
    for k in range(spec.L):
        for d in range(spec.D):
            sl = [spec.layout[n] for n in spec.names(k, d)]
            out.append(sl + [None] * (4 - len(sl)))
    return out


def _views(slices, flat):
    """[[W_ih, W_hh, b_ih, b_hh] per layer/direction] as views of flat."""
    return [[None if sl is None else
             flat[sl[0]:sl[0] + int(np.prod(sl[1]))].reshape(sl[1]) for sl in row]
            for row in slices]


def _split_x(x, dtype, I):
    """(T, B, I) float -> ((T*B, I), None); (T, B) ids -> (None, (T*B,)).
    Ids are checked again here: an out-of-range id never reaches C code."""
    T, B = x.shape[0], x.shape[1]
    if x.dtype.kind in "iu":
        tok = np.ascontiguousarray(x, dtype=np.int64).reshape(T * B)
        if tok.size and (tok.min() < 0 or tok.max() >= I):
            raise ValueError(f"x: token ids must be in [0, {I}) (input_size), got "
                             f"values in [{tok.min()}, {tok.max()}]")
        return None, tok
    return np.ascontiguousarray(x, dtype=dtype).reshape(T * B, x.shape[2]), None


# ============================================================================
# the core: forward and backward over all layers and directions
# ============================================================================
def _forward(w, spec, flat, x2, tok, lengths, state0, state_n):
    """All layers and directions into the workspace; returns the top
    layer's output (a workspace view) and fills state_n."""
    T, B, H, L, D = w.T, w.B, w.H, w.L, w.D
    GH = w.G * H
    np.copyto(w.len, lengths)
    views = w.bind(flat)
    for k in range(L):
        xin = x2 if k == 0 else w.LOUT[k - 1].reshape(T * B, D * H)
        for d in range(D):
            kd = k * D + d
            W_ih, W_hh = views[kd][:2]
            P = (w.GATES[kd] if (w.lstm or w.gru) else
                 w.HX[kd, 1:T + 1]).reshape(T * B, GH)
            if k == 0 and tok is not None:
                np.copyto(w.WIT, W_ih.T)
                np.take(w.WIT, tok, axis=0, out=P, mode="clip")  # ids checked
            else:
                np.matmul(xin, W_ih.T, out=P)
            h0 = T + 1 if d else 0
            w.HX[kd, h0] = state0[0, kd]
            if w.lstm:
                w.CX[kd, h0] = state0[1, kd]
            fq = w.fq[kd]
            if w.small:
                np.copyto(w.WT, W_hh.T)
                w.fwd(fq, ffi.NULL, 0, T)
            else:
                rows, WhhT, prod, pp = w.hrows[kd], W_hh.T, w.prod_f, w.PRODp
                fwd = w.fwd
                for s in range(T):
                    t = T - 1 - s if d else s
                    np.matmul(rows[t + 2 if d else t], WhhT, out=prod)
                    fwd(fq, pp, s, 1)
            hn = 1 if d else T
            state_n[0, kd] = w.HX[kd, hn]
            if w.lstm:
                state_n[1, kd] = w.CX[kd, hn]
    return w.LOUT[L - 1]


def _backward(w, spec, flat, x2, tok, dstate_n, grad, dx, dstate0, sclip,
              want_flow, dcs=None):
    """BPTT after _forward with the gradient of the top output in w.DTOP.
    Fills the core part of grad, dx ((T*B, I) or None) and dstate0.
    dcs (T, B, D*H) or None: dL/dc_t of the top LSTM layer, added to the
    carried dc before each step (the steps then run one call each)."""
    T, B, H, L, D = w.T, w.B, w.H, w.L, w.D
    GH = w.G * H
    D2 = w.DELTA.reshape(T * B, GH)
    D2H = w.DELTAH.reshape(T * B, GH)     # D2 itself except for the GRU
    views = w.bind(flat)
    gviews = w.gviews if grad is w.grad else _views(w.slices, grad)
    if want_flow:
        w.flow[:] = 0
    for k in range(L - 1, -1, -1):
        if k == 0:
            xin, din = x2, dx
        else:
            xin, din = w.LOUT[k - 1].reshape(T * B, D * H), w.din(k)
        for d in range(D):
            kd = k * D + d
            W_ih, W_hh, _, _ = views[kd]
            gW_ih, gW_hh, gb_ih, gb_hh = gviews[kd]
            bq = w.bq[kd]
            bq.W = w.whh_p[kd]
            bq.d.use_sclip = sclip is not None
            bq.d.sclip = 0.0 if sclip is None else sclip
            bq.d.want_flow = bool(want_flow and k == L - 1)
            w.DH[0] = dstate_n[0, kd]
            if w.lstm:
                w.DH[1] = dstate_n[1, kd]
            dcd = None
            if dcs is not None and k == L - 1:
                dcd = np.where(np.arange(T)[:, None, None] < w.len[None, :, None],
                               dcs[:, :, d * H:(d + 1) * H], 0)
            if w.small and dcd is None:
                w.bwd(bq, ffi.NULL, 0, T)
            elif w.small:
                for s in range(T):
                    w.DH[1] += dcd[s if d else T - 1 - s]
                    w.bwd(bq, ffi.NULL, s, 1)
            else:
                rows, prod, pp, bwd = w.drows, w.prod_b, w.PRODp, w.bwd
                for s in range(T):   # prod of step s-1 is merged first (s > 0)
                    if dcd is not None:
                        w.DH[1] += dcd[s if d else T - 1 - s]
                    bwd(bq, pp, s, 1)
                    np.matmul(rows[s if d else T - 1 - s], W_hh, out=prod)
                bwd(bq, pp, T, 0)
            dstate0[0, kd] = w.DH[0]
            if w.lstm:
                dstate0[1, kd] = w.DH[1]
            # parameter gradients: one product each over all T*B deltas
            hprev = w.HX[kd, 2:T + 2] if d else w.HX[kd, 0:T]
            np.matmul(D2H.T, hprev.reshape(T * B, H), out=gW_hh)
            if k == 0 and tok is not None:
                dwt = np.zeros((spec.I, GH), dtype=grad.dtype)
                bad = getattr(lib, "fr_scatter_add_" + w.sfx)(
                    T * B, GH, ffi.from_buffer("int64_t[]", tok),
                    w._ptr(D2), spec.I, w._ptr(dwt))
                if bad:
                    raise ValueError(f"x: {bad} token ids outside [0, {spec.I})")
                np.copyto(gW_ih, dwt.T)
            else:
                np.matmul(D2.T, xin, out=gW_ih)
            if gb_ih is not None:
                np.add.reduce(D2, axis=0, out=gb_ih)
                if w.gru:
                    np.add.reduce(D2H, axis=0, out=gb_hh)
                else:
                    gb_hh[...] = gb_ih
            if din is not None:   # gradient of this layer's input
                if d == 0:
                    np.matmul(D2, W_ih, out=din)
                else:
                    din += D2 @ W_ih
    if want_flow:
        return np.sqrt(w.flow)
    return None


def core_forward(spec, flat, x, lengths, state0, ctx=None):
    """out (T, B, D*H), state_n (S, L*D, B, H), cache for core_backward."""
    T, B = x.shape[0], x.shape[1]
    x2, tok = _split_x(x, flat.dtype, spec.I)
    w = _work(ctx, spec, flat, T, B, tok is not None)
    state_n = np.empty_like(state0)
    top = _forward(w, spec, flat, x2, tok, lengths, state0, state_n)
    return top.copy(), state_n, (w, x2, tok)


def core_backward(spec, flat, cache, dout, dstate_n, state_clip=None, ctx=None,
                  dcs=None):
    """dx (None for token ids), dstate0, grad (core part), flow (T,);
    dcs: optional dL/dc_t of the top LSTM layer (T, B, D*H)."""
    w, x2, tok = cache
    T, B = w.T, w.B
    np.copyto(w.DTOP, dout)
    grad = np.zeros_like(flat)
    dx = None if tok is not None else np.empty((T * B, spec.I), flat.dtype)
    dstate0 = np.zeros_like(dstate_n)
    flow = _backward(w, spec, flat, x2, tok, dstate_n, grad, dx, dstate0,
                     state_clip, True, dcs if w.lstm else None)
    if dx is not None:
        dx = dx.reshape(T, B, spec.I)
    return dx, dstate0, grad, flow


def top_cells(spec, cache):
    """The top layer's cell states c_t of the LSTM forward that made `cache`:
    (T, B, D*H) laid out like `out`, zero at padding steps."""
    w = cache[0]
    T, B, H, L, D = w.T, w.B, w.H, w.L, w.D
    cs = np.empty((T, B, D * H), dtype=w.CX.dtype)
    for d in range(D):
        cs[:, :, d * H:(d + 1) * H] = w.CX[(L - 1) * D + d, 1:T + 1]
    cs[np.arange(T)[:, None] >= w.len[None, :]] = 0
    return cs


# ============================================================================
# read-out and loss
# ============================================================================
def _fptr(w, a):
    return ffi.from_buffer(w.ctype + "[]", a)


def _readout(w, spec, flat, top):
    """z (R, O) into w.Z: zero at padding rows for readout 'all'; for
    'last' from each sequence's last valid step (also left in w.HLAST)."""
    T, B = w.T, w.B
    w.bind(flat)
    W, boff = w.W_out, w.out_slice[2]
    if spec.readout == "last":
        np.copyto(w.HLAST, top[w.len - 1, w.ar])
        h = w.HLAST
    else:
        h = top.reshape(T * B, -1)
    np.matmul(h, W.T, out=w.Z)
    getattr(lib, "fr_bias_rows_" + w.sfx)(w.la, w.flat_p + boff, w.Zp)
    return W, h


def _loss_grad(w, spec, flat, top, y, grad):
    """Loss; read-out gradients into grad; dL/d top into w.DTOP."""
    W, h = _readout(w, spec, flat, top)
    R = w.la.R
    if spec.loss == "cross_entropy":
        yi = np.ascontiguousarray(y, dtype=np.int64).reshape(-1)
        if yi.size != R:
            raise ValueError(f"y: expected {R} class ids, got {yi.size}")
        yip, yfp = ffi.from_buffer("int64_t[]", yi), ffi.NULL
    else:
        yf = np.ascontiguousarray(y, dtype=flat.dtype).reshape(-1)
        if yf.size != R * spec.O:
            raise ValueError(f"y: expected {R}x{spec.O} targets, got {yf.size} values")
        yip, yfp = ffi.NULL, _fptr(w, yf)
    loss = getattr(lib, "fr_loss_" + w.sfx)(w.la, w.Zp, yip, yfp, w.DZp)
    if w.la.bad:
        raise ValueError(f"y: {w.la.bad} class ids outside [0, {spec.O})")
    off, shape, boff = w.out_slice
    gW = grad[off:off + shape[0] * shape[1]].reshape(shape)
    np.matmul(w.DZ.T, h, out=gW)
    np.add.reduce(w.DZ, axis=0, out=grad[boff:boff + spec.O])
    if spec.readout == "last":
        w.DTOP[...] = 0
        w.DTOP[w.len - 1, w.ar] = w.DZ @ W
    else:
        np.matmul(w.DZ, W, out=w.DTOP.reshape(w.T * w.B, -1))
    return float(loss)


# ============================================================================
# model-level entry points
# ============================================================================
def _run(spec, flat, x, lengths, state0, ctx):
    T, B = x.shape[0], x.shape[1]
    x2, tok = _split_x(x, flat.dtype, spec.I)
    w = _work(ctx, spec, flat, T, B, tok is not None)
    state_n = np.empty_like(state0)
    top = _forward(w, spec, flat, x2, tok, lengths, state0, state_n)
    return w, x2, tok, top, state_n


def model_forward(spec, flat, x, lengths, state0, ctx=None):
    w, _, _, top, state_n = _run(spec, flat, x, lengths, state0, ctx)
    _readout(w, spec, flat, top)
    z = w.Z.copy()
    if spec.readout == "all":
        z = z.reshape(w.T, w.B, spec.O)
    return z, state_n


def _loss_and_grad(spec, flat, x, lengths, state0, y, sclip, want_flow, ctx):
    w, x2, tok, top, state_n = _run(spec, flat, x, lengths, state0, ctx)
    grad = w.grad
    loss = _loss_grad(w, spec, flat, top, y, grad)
    flow = _backward(w, spec, flat, x2, tok, w.zstate, grad, None, w.dstate0,
                     sclip, want_flow)
    return w, loss, grad, state_n, flow


def train_step(spec, flat, opt_state, step, x, lengths, state0, y, *, opt,
               hyper, clip, limit, state_clip, ctx=None):
    """One fused training step; flat and opt_state are updated in place
    unless the loss or the gradient norm is not finite."""
    if opt_state.dtype != flat.dtype or opt_state.shape != (2, flat.size):
        raise TypeError(f"opt_state: expected {flat.dtype} of shape {(2, flat.size)}, "
                        f"got {opt_state.dtype} {opt_state.shape}")
    w, loss, grad, state_n, _ = _loss_and_grad(spec, flat, x, lengths, state0,
                                               y, state_clip, False, ctx)
    r = _update(w.ua, flat, opt_state, step, grad, loss, opt, hyper, clip, limit)
    return dict(r, loss=loss, state_n=state_n)


def _update(u, flat, opt_state, step, grad, loss, opt, hyper, clip, limit):
    """fr_update (norm, guard, clipping, optimizer) with the C arguments u."""
    u.opt, u.clip, u.step = _OPTS[opt], _CLIPS[clip], step
    u.lr = hyper["lr"]
    u.momentum = hyper.get("momentum", 0.0)
    u.beta1 = hyper.get("beta1", 0.0)
    u.beta2 = hyper.get("beta2", 0.0)
    u.eps = hyper.get("eps", 0.0)
    u.limit = 0.0 if limit is None else limit
    u.loss = loss
    sfx, ct = ("f32", "float[]") if flat.dtype == np.float32 else ("f64", "double[]")
    p = functools.partial(ffi.from_buffer, ct)
    getattr(lib, "fr_update_" + sfx)(u, flat.size, p(flat), p(grad),
                                     p(opt_state[0]), p(opt_state[1]))
    return dict(grad_norm=float(u.grad_norm), clipped=bool(u.clipped),
                skipped=bool(u.skipped), grad=grad)


def train_grad(spec, flat, x, lengths, state0, y, *, state_clip, ctx=None):
    _, loss, grad, state_n, _ = _loss_and_grad(spec, flat, x, lengths, state0,
                                               y, state_clip, False, ctx)
    return dict(loss=loss, grad=grad, state_n=state_n)


def apply_update(spec, flat, opt_state, step, grad, loss, *, opt, hyper, clip,
                 limit, ctx=None):
    if opt_state.dtype != flat.dtype or opt_state.shape != (2, flat.size):
        raise TypeError(f"opt_state: expected {flat.dtype} of shape {(2, flat.size)}, "
                        f"got {opt_state.dtype} {opt_state.shape}")
    if grad.dtype != flat.dtype or grad.shape != flat.shape or not grad.flags.c_contiguous:
        raise TypeError(f"grad: expected a contiguous {flat.dtype} array of shape "
                        f"{flat.shape}, got {grad.dtype} {grad.shape}")
    u = ctx_state(ctx, "c_update", lambda: ffi.new("fr_update_args *"))
    return _update(u, flat, opt_state, step, grad, loss, opt, hyper, clip, limit)


def gradient_flow(spec, flat, x, lengths, state0, y, ctx=None):
    return _loss_and_grad(spec, flat, x, lengths, state0, y, None, True, ctx)[4]
