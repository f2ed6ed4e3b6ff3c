"""Recurrent layers: drop-in for torch.nn.RNN / nn.LSTM / nn.GRU /
nn.RNNCell / nn.LSTMCell / nn.GRUCell, on NumPy arrays, with an explicit
backward.

A layer owns its parameters as one flat buffer, a ParamBuffer (``_pbuf``,
fastrnn/_params.py: every host read or write goes through it, which makes the
host copy current first); ``state_dict`` returns copies under PyTorch's
names. Validation happens here; the numbers are computed by the chosen
backend (fastrnn.backends).

Threads: every layer (and every SequenceModel, which shares its core's) has
a re-entrant lock; forward, backward, state_dict and load_state_dict hold it,
so calls on one layer from several threads run one at a time, each as if
alone (backward goes through the last forward, whichever thread made it).
Different layers share nothing and run in parallel.
"""
import threading

import numpy as np

from . import backends
from ._params import HasParams, ParamBuffer
from ._spec import make_spec, n_core_params, views
from ._validate import (as_array, check_bool, check_choice, check_dtype,
                        check_int, check_positive, sequence_args, sequence_input,
                        state_arg)
from .init import SCHEMES, init_core


class _Base(HasParams):
    """Shared by layers and cells: flat parameters (HasParams), backend."""

    def _setup(self, spec, dtype, init, seed, backend):
        self.dtype = check_dtype(dtype)
        check_choice("init", init, SCHEMES)
        if seed is not None:
            check_int("seed", seed, lo=0)
        self.init = init
        self.seed = seed
        self.backend = backends.resolve(backend, spec.mode)
        self._be = backends.get(self.backend)
        self._spec = spec
        tmp = np.zeros(n_core_params(spec), dtype=np.float64)
        init_core(spec, tmp, init, np.random.default_rng(seed))
        self._pbuf = ParamBuffer(spec, tmp.astype(self.dtype))
        self._ctx = {}
        self._cache = None
        self.grads = None
        self._lock = threading.RLock()

    def _forget_cache(self):
        """After the parameters were replaced: no backward through an
        earlier forward."""
        self._cache = None

    @property
    def _device_inputs(self):
        """Whether the backend reads device arrays in place (cuda)."""
        return getattr(self._be, "DEVICE_INPUTS", False)


class _Recurrent(_Base):
    """Stacked, optionally bidirectional recurrent layer over a sequence."""
    _mode = None

    def __init__(self, mode, input_size, hidden_size, num_layers, bias,
                 batch_first, bidirectional, dtype, init, seed, backend):
        self.input_size = check_int("input_size", input_size, lo=1)
        self.hidden_size = check_int("hidden_size", hidden_size, lo=1)
        self.num_layers = check_int("num_layers", num_layers, lo=1)
        self.bias = check_bool("bias", bias)
        self.batch_first = check_bool("batch_first", batch_first)
        self.bidirectional = check_bool("bidirectional", bidirectional)
        self.num_directions = 2 if self.bidirectional else 1
        spec = make_spec(mode, self.input_size, self.hidden_size,
                         self.num_layers, self.num_directions, self.bias)
        self._setup(spec, dtype, init, seed, backend)

    @property
    def _lstm(self):
        return self._spec.mode == "lstm"

    def _state_shape(self, B):
        return (self.num_directions * self.num_layers, B, self.hidden_size)

    def _state0(self, hx, B):
        shape = self._state_shape(B)
        S = self._spec.S
        st = np.zeros((S,) + shape, dtype=self.dtype)
        if hx is None:
            return st
        if self._lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"hx: expected a pair (h0, c0) for the LSTM, "
                                f"got {type(hx).__name__}")
            st[0] = state_arg(hx[0], shape, self.dtype, "hx[0] (h0)")
            st[1] = state_arg(hx[1], shape, self.dtype, "hx[1] (c0)")
        else:
            st[0] = state_arg(hx, shape, self.dtype, "hx")
        return st

    def _state_out(self, st):
        return (st[0], st[1]) if self._lstm else st[0]

    def forward(self, x, hx=None, lengths=None):
        """out, h_n (RNN) or out, (h_n, c_n) (LSTM), PyTorch's shapes.
        Padding steps (t >= lengths[b]) are ignored whatever they hold (NaN
        and inf included); token ids must be in range everywhere."""
        xs, T, B, ln = sequence_args(x, lengths, self.input_size, self.dtype,
                                     self.batch_first, device=self._device_inputs)
        st0 = self._state0(hx, B)
        with self._lock:
            out, st_n, cache = self._be.core_forward(self._spec, self._params(), xs,
                                                     ln, st0, ctx=self._ctx)
            self._cache = (cache, T, B, np.dtype(xs.dtype).kind in "iu")
        if self.batch_first:
            out = np.ascontiguousarray(out.swapaxes(0, 1))
        return out, self._state_out(st_n)

    __call__ = forward

    def backward(self, grad_out, grad_hn=None, *, state_clip=None):
        """BPTT through the last forward call.

        Returns grad_x (None for token ids) and grad_hx (a pair for the LSTM);
        parameter gradients go to self.grads (state_dict keys).
        """
        with self._lock:
            return self._backward(grad_out, grad_hn, state_clip)

    def _backward(self, grad_out, grad_hn, state_clip):
        if self._cache is None:
            raise RuntimeError("backward: call forward first (backward "
                               "back-propagates through the last forward call)")
        cache, T, B, tok = self._cache
        H, D = self.hidden_size, self.num_directions
        oshape = (B, T, D * H) if self.batch_first else (T, B, D * H)
        if grad_out is None:
            g = np.zeros((T, B, D * H), dtype=self.dtype)
        else:
            g = state_arg(grad_out, oshape, self.dtype, "grad_out")
            if self.batch_first:
                g = np.ascontiguousarray(g.swapaxes(0, 1))
        S = self._spec.S
        shape = self._state_shape(B)
        dst = np.zeros((S,) + shape, dtype=self.dtype)
        if grad_hn is not None:
            if self._lstm:
                if not isinstance(grad_hn, (tuple, list)) or len(grad_hn) != 2:
                    raise TypeError("grad_hn: expected a pair (grad_h_n, grad_c_n) "
                                    f"for the LSTM, got {type(grad_hn).__name__}")
                for i, part in enumerate(grad_hn):
                    if part is not None:
                        dst[i] = state_arg(part, shape, self.dtype, f"grad_hn[{i}]")
            else:
                dst[0] = state_arg(grad_hn, shape, self.dtype, "grad_hn")
        if state_clip is not None:
            state_clip = check_positive("state_clip", state_clip)
        dx, dst0, grad, _ = self._be.core_backward(self._spec, self._params(), cache,
                                                   g, dst, state_clip, ctx=self._ctx)
        self.grads = {k: v.copy() for k, v in views(self._spec, grad).items()}
        if dx is not None and self.batch_first:
            dx = np.ascontiguousarray(dx.swapaxes(0, 1))
        return dx, self._state_out(dst0)

    def __repr__(self):
        mode = self._spec.mode
        extra = f", nonlinearity={mode!r}" if mode not in ("lstm", "gru") else ""
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, "
                f"num_layers={self.num_layers}{extra}, bias={self.bias}, "
                f"batch_first={self.batch_first}, bidirectional={self.bidirectional}, "
                f"dtype={self.dtype.name}, backend={self.backend!r})")


class RNN(_Recurrent):
    """Elman RNN: h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), f in
    {tanh, relu, sigmoid}; stacked and/or bidirectional.

    Parameters (state_dict): weight_ih_l{k} (H, I_k), weight_hh_l{k} (H, H),
    bias_ih_l{k} (H,), bias_hh_l{k} (H,), and *_reverse for the backward
    direction.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh",
                 bias=True, batch_first=False, bidirectional=False, *,
                 dtype=np.float32, init="default", seed=None, backend="auto"):
        check_choice("nonlinearity", nonlinearity, ("tanh", "relu", "sigmoid"))
        self.nonlinearity = nonlinearity
        super().__init__(nonlinearity, input_size, hidden_size, num_layers, bias,
                         batch_first, bidirectional, dtype, init, seed, backend)


class LSTM(_Recurrent):
    """LSTM with PyTorch's gate order (i, f, g, o):
    c_t = f*c_{t-1} + i*g, h_t = o*tanh(c_t). State is the pair (h, c).
    Parameters as torch.nn.LSTM: weight_ih_l{k} (4H, I_k), weight_hh_l{k} (4H, H), ...
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, bidirectional=False, *, dtype=np.float32,
                 init="default", seed=None, backend="auto"):
        if init == "identity":
            raise ValueError("init: 'identity' (IRNN) is defined for fr.RNN only; "
                             "use 'default', 'orthogonal' or 'xavier' for the LSTM")
        super().__init__("lstm", input_size, hidden_size, num_layers, bias,
                         batch_first, bidirectional, dtype, init, seed, backend)


class GRU(_Recurrent):
    """GRU with PyTorch's gate order (r, z, n) and equations:
    r = s(W_ir x + b_ir + W_hr h + b_hr), z = s(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) n + z h.
    Parameters as torch.nn.GRU: weight_ih_l{k} (3H, I_k), weight_hh_l{k}
    (3H, H), bias_ih_l{k} (3H,), bias_hh_l{k} (3H,); state h only.
    `dropout` (between stacked layers) must be 0 for now.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, *,
                 dtype=np.float32, init="default", seed=None, backend="auto"):
        _no_dropout(dropout)
        self.dropout = 0.0
        if init == "identity":
            raise ValueError("init: 'identity' (IRNN) is defined for fr.RNN only; "
                             "use 'default', 'orthogonal' or 'xavier' for the GRU")
        super().__init__("gru", input_size, hidden_size, num_layers, bias,
                         batch_first, bidirectional, dtype, init, seed, backend)


def _no_dropout(dropout):
    """Inter-layer dropout is not implemented yet: 0 only."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating,
                                                             np.integer)):
        raise TypeError(f"dropout: expected a number, got {type(dropout).__name__}")
    if not 0 <= dropout <= 1:
        raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout}")
    if dropout != 0:
        raise NotImplementedError(f"dropout={dropout}: inter-layer dropout is not "
                                  "implemented yet; use dropout=0.0")


class _Cell(_Base):
    """One time step; reuses the sequence kernels with T = 1."""

    def __init__(self, mode, input_size, hidden_size, bias, dtype, init, seed, backend):
        self.input_size = check_int("input_size", input_size, lo=1)
        self.hidden_size = check_int("hidden_size", hidden_size, lo=1)
        self.bias = check_bool("bias", bias)
        spec = make_spec(mode, self.input_size, self.hidden_size, 1, 1, self.bias,
                         cell=True)
        self._setup(spec, dtype, init, seed, backend)

    @property
    def _lstm(self):
        return self._spec.mode == "lstm"

    def _input(self, x):
        x = as_array("input", x)
        if x.dtype.kind in "iu":  # token ids (B,) or one id ()
            if x.ndim not in (0, 1):
                raise ValueError(f"input: integer token ids must have shape (B,) or (), got {x.shape}")
            batched = x.ndim == 1
            xs = sequence_input(x.reshape(1, -1), self.input_size, self.dtype, False, "input")
        else:
            if x.dtype.kind != "f":
                raise TypeError(f"input: expected a float array or integer ids, got dtype {x.dtype}")
            if x.ndim not in (1, 2) or x.shape[-1] != self.input_size:
                raise ValueError(f"input: expected shape (B, {self.input_size}) or "
                                 f"({self.input_size},), got {x.shape}")
            batched = x.ndim == 2
            xs = sequence_input(x.reshape(1, -1, self.input_size), self.input_size,
                                self.dtype, False, "input")
        return xs, batched

    def _state(self, v, B, batched, name):
        shape = (B, self.hidden_size) if batched else (self.hidden_size,)
        return state_arg(v, shape, self.dtype, name).reshape(1, 1, B, self.hidden_size)

    def forward(self, input, hx=None):
        with self._lock:
            return self._forward(input, hx)

    def _forward(self, input, hx):
        xs, batched = self._input(input)
        B = xs.shape[1]
        S = self._spec.S
        st0 = np.zeros((S, 1, B, self.hidden_size), dtype=self.dtype)
        if hx is not None:
            if self._lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(f"hx: expected a pair (h, c) for LSTMCell, got {type(hx).__name__}")
                st0[0] = self._state(hx[0], B, batched, "hx[0] (h)")[0]
                st0[1] = self._state(hx[1], B, batched, "hx[1] (c)")[0]
            else:
                st0[0] = self._state(hx, B, batched, "hx")[0]
        ln = np.ones(B, dtype=np.int64)
        _, st_n, cache = self._be.core_forward(self._spec, self._params(), xs, ln, st0,
                                               ctx=self._ctx)
        self._cache = (cache, B, batched)
        res = [st_n[i, 0] if batched else st_n[i, 0, 0] for i in range(S)]
        return (res[0], res[1]) if self._lstm else res[0]

    __call__ = forward

    def backward(self, grad_h):
        """grad_h: dL/dh' (a pair (dL/dh', dL/dc') for LSTMCell).
        Returns (grad_input, grad_hx); parameter gradients in self.grads."""
        with self._lock:
            return self._backward(grad_h)

    def _backward(self, grad_h):
        if self._cache is None:
            raise RuntimeError("backward: call the cell first")
        cache, B, batched = self._cache
        S = self._spec.S
        dst = np.zeros((S, 1, B, self.hidden_size), dtype=self.dtype)
        parts = grad_h if self._lstm else (grad_h,)
        if self._lstm and (not isinstance(grad_h, (tuple, list)) or len(grad_h) != 2):
            raise TypeError("grad_h: expected a pair (grad_h, grad_c) for LSTMCell")
        for i, part in enumerate(parts):
            if part is not None:
                dst[i] = self._state(part, B, batched, "grad_h")[0]
        g = np.zeros((1, B, self.hidden_size), dtype=self.dtype)
        dx, dst0, grad, _ = self._be.core_backward(self._spec, self._params(), cache, g,
                                                   dst, None, ctx=self._ctx)
        self.grads = {k: v.copy() for k, v in views(self._spec, grad).items()}
        if dx is not None:
            dx = dx[0] if batched else dx[0, 0]
        res = [dst0[i, 0] if batched else dst0[i, 0, 0] for i in range(S)]
        return dx, ((res[0], res[1]) if self._lstm else res[0])

    def __repr__(self):
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, "
                f"bias={self.bias}, dtype={self.dtype.name}, backend={self.backend!r})")


class RNNCell(_Cell):
    """torch.nn.RNNCell: h' = f(W_ih x + b_ih + W_hh h + b_hh)."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", *,
                 dtype=np.float32, init="default", seed=None, backend="auto"):
        check_choice("nonlinearity", nonlinearity, ("tanh", "relu", "sigmoid"))
        self.nonlinearity = nonlinearity
        super().__init__(nonlinearity, input_size, hidden_size, bias, dtype, init,
                         seed, backend)


class LSTMCell(_Cell):
    """torch.nn.LSTMCell: (h', c') = cell(x, (h, c)), gates (i, f, g, o)."""

    def __init__(self, input_size, hidden_size, bias=True, *, dtype=np.float32,
                 init="default", seed=None, backend="auto"):
        if init == "identity":
            raise ValueError("init: 'identity' (IRNN) is defined for fr.RNN only; "
                             "use 'default', 'orthogonal' or 'xavier' for the LSTM")
        super().__init__("lstm", input_size, hidden_size, bias, dtype, init, seed,
                         backend)


class GRUCell(_Cell):
    """torch.nn.GRUCell: h' = cell(x, h), gates (r, z, n),
    h' = (1 - z) n + z h with n = tanh(W_in x + b_in + r (W_hn h + b_hn))."""

    def __init__(self, input_size, hidden_size, bias=True, *, dtype=np.float32,
                 init="default", seed=None, backend="auto"):
        if init == "identity":
            raise ValueError("init: 'identity' (IRNN) is defined for fr.RNN only; "
                             "use 'default', 'orthogonal' or 'xavier' for the GRU")
        super().__init__("gru", input_size, hidden_size, bias, dtype, init, seed,
                         backend)
