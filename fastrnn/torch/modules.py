"""torch.nn modules on fastrnn's kernels: RNN, LSTM, GRU, RNNCell, LSTMCell,
GRUCell.

Constructors take torch's arguments (``device=``, ``dtype=`` included) plus
fastrnn's own keywords (``init``, ``seed``, ``backend``; ``"sigmoid"`` as a
nonlinearity). Parameters are ``nn.Parameter``s with torch's names, shapes
and gate order, kept as consecutive views of one flat buffer so that the
kernels read them in place; a torch state_dict loads unchanged and back.
Every call is one forward op and (in training) one backward op over the
whole sequence (fastrnn/torch/ops.py).
"""
import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastrnn import backends
from fastrnn._spec import make_spec, n_core_params
from fastrnn.init import SCHEMES, init_core
from fastrnn.torch import ops  # noqa: F401  (registers torch.ops.fastrnn)

_DTYPES = (torch.float32, torch.float64)


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    return int(v)


def _check_options(dropout, proj_size):
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) \
            or not 0 <= dropout <= 1:
        raise ValueError(f"dropout: expected a number in [0, 1], got {dropout!r}")
    if dropout > 0:
        raise NotImplementedError(
            f"dropout={dropout}: fastrnn.torch does not support dropout "
            "between layers yet (use dropout=0)")
    if proj_size:
        raise NotImplementedError(
            f"proj_size={proj_size}: fastrnn.torch does not support LSTM "
            "projections yet (use proj_size=0)")


def _factory(device, dtype):
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in _DTYPES:
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cpu":
        raise NotImplementedError(
            f"device={device}: fastrnn.torch runs on CPU tensors only so far")
    return device, dtype


def _reflatten(module, _incompatible_keys):
    """load_state_dict post-hook (assign=True replaces the parameters)."""
    module.flatten_parameters()


class _Base(nn.Module):
    """Flat parameters, initialisation and the call into the ops."""

    def _build(self, mode, L, D, cell, device, dtype, init, seed, backend):
        if init not in SCHEMES:
            raise ValueError(f"init: expected one of {SCHEMES}, got {init!r}")
        if init == "identity" and mode in ("lstm", "gru"):
            raise ValueError("init: 'identity' (IRNN) is defined for the RNN only")
        if seed is not None:
            _check_int("seed", seed, 0)
        device, dtype = _factory(device, dtype)
        self.backend = backends.resolve(backend, mode)
        self._mode = mode
        self._spec = make_spec(mode, self.input_size, self.hidden_size, L, D,
                               self.bias, cell=cell)
        self._names = list(self._spec.layout)
        buf = torch.empty(n_core_params(self._spec), device=device, dtype=dtype)
        for name, (off, shape) in self._spec.layout.items():
            n = int(np.prod(shape))
            self.register_parameter(name, nn.Parameter(buf[off:off + n].view(shape)))
        self.init, self.seed = init, seed
        if init == "default" and seed is None:
            # torch's own initialisation from torch's generator: after the
            # same torch.manual_seed, the same weights as torch.nn's module
            stdv = 1.0 / math.sqrt(self.hidden_size)
            with torch.no_grad():
                for p in self.parameters():
                    p.uniform_(-stdv, stdv)
        else:
            tmp = np.zeros(buf.numel(), dtype=np.float64)
            init_core(self._spec, tmp, init, np.random.default_rng(seed))
            with torch.no_grad():
                buf.copy_(torch.from_numpy(tmp))
        self.register_load_state_dict_post_hook(_reflatten)

    def _params(self):
        ps = self._parameters
        return [ps[n] for n in self._names]

    def flatten_parameters(self):
        """Make the parameters consecutive views of one buffer again (after
        ``.to()``, ``.double()`` or a ``load_state_dict(assign=True)``);
        the kernels then read them without a copy."""
        params = self._params()
        n = sum(p.numel() for p in params)
        flat = ops._flat_params(params)
        if flat.numel() == n and flat.data_ptr() == params[0].data_ptr() \
                and all(p.dtype == params[0].dtype for p in params):
            return
        buf = torch.empty(n, dtype=params[0].dtype, device=params[0].device)
        off = 0
        with torch.no_grad():
            for p in params:
                k = p.numel()
                buf[off:off + k].copy_(p.reshape(-1))
                p.data = buf[off:off + k].view(p.shape)
                off += k

    def __setstate__(self, state):
        # copy.deepcopy and pickle restore the parameters one by one
        super().__setstate__(state)
        self.flatten_parameters()

    def _apply(self, fn, *args, **kw):
        ret = super()._apply(fn, *args, **kw)
        self.flatten_parameters()
        return ret

    def _run(self, x, h0, c0, lengths, L, D, cells=False):
        """x (T, B, I) time-major; returns out, h_n, c_n, c_seq."""
        p0 = self._params()[0]
        if x.dtype != p0.dtype:
            raise TypeError(f"input: expected dtype {p0.dtype} (the module's), "
                            f"got {x.dtype}")
        if not x.is_floating_point():
            raise TypeError(f"input: expected a float tensor, got {x.dtype}")
        out, h_n, c_n, cs, _ = ops.run(
            x.contiguous(), self._params(), h0, c0, lengths, self._mode,
            self.hidden_size, L, D, self.bias, self._spec.cell, self.backend,
            cells)
        return out, h_n, c_n, cs

    def _state(self, v, shape, name, dtype):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(v).__name__}")
        if tuple(v.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got "
                             f"{tuple(v.shape)}")
        if v.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype}, got {v.dtype}")
        return v.contiguous()


class _Recurrent(_Base):
    """Stacked, optionally bidirectional layer over a whole sequence."""

    def __init__(self, mode, input_size, hidden_size, num_layers, bias,
                 batch_first, dropout, bidirectional, proj_size, device, dtype,
                 init, seed, backend):
        super().__init__()
        self.input_size = _check_int("input_size", input_size, 1)
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.num_layers = _check_int("num_layers", num_layers, 1)
        for name, v in (("bias", bias), ("batch_first", batch_first),
                        ("bidirectional", bidirectional)):
            if not isinstance(v, bool):
                raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        _check_options(dropout, proj_size)
        self.dropout, self.proj_size = float(dropout), 0
        D = 2 if bidirectional else 1
        self._build(mode, self.num_layers, D, False, device, dtype, init, seed,
                    backend)

    def forward(self, input, hx=None, *, return_cell_states=False):
        lstm = self._mode == "lstm"
        L, D, H = self.num_layers, 2 if self.bidirectional else 1, self.hidden_size
        packed = isinstance(input, PackedSequence)
        lengths = None
        batched = True
        if packed:
            data, batch_sizes, sorted_idx, unsorted_idx = input
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"input: expected a tensor or a PackedSequence, "
                                f"got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"input: expected a 2-D (unbatched) or 3-D tensor, "
                                 f"got {input.dim()}-D of shape {tuple(input.shape)}")
            batched = input.dim() == 3
            if not batched:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input: expected {self.input_size} features in the "
                             f"last dimension, got shape {tuple(input.shape if not packed else x.shape)}")
        B = x.shape[1]
        shape = (L * D, B, H)
        if hx is None:
            h0 = c0 = None
        else:
            if lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(f"hx: expected a pair (h_0, c_0) for the LSTM, "
                                    f"got {type(hx).__name__}")
                h0, c0 = hx
            else:
                h0, c0 = hx, None
            if not batched:
                h0 = h0.unsqueeze(1) if isinstance(h0, torch.Tensor) and h0.dim() == 2 else h0
                c0 = c0.unsqueeze(1) if isinstance(c0, torch.Tensor) and c0.dim() == 2 else c0
            if packed and sorted_idx is not None:
                h0 = h0.index_select(1, sorted_idx)
                c0 = c0.index_select(1, sorted_idx) if lstm else c0
            h0 = self._state(h0, shape, "hx[0] (h_0)" if lstm else "hx", x.dtype)
            c0 = self._state(c0, shape, "hx[1] (c_0)", x.dtype) if lstm else None
        if return_cell_states and not lstm:
            raise ValueError("return_cell_states: only the LSTM has cell states")
        out, h_n, c_n, cs = self._run(x, h0, c0, lengths, L, D,
                                      bool(return_cell_states))
        if packed:
            out = PackedSequence(pack_padded_sequence(out, lengths).data,
                                 batch_sizes, sorted_idx, unsorted_idx)
            if return_cell_states:
                cs = PackedSequence(pack_padded_sequence(cs, lengths).data,
                                    batch_sizes, sorted_idx, unsorted_idx)
            if unsorted_idx is not None:
                h_n = h_n.index_select(1, unsorted_idx)
                c_n = c_n.index_select(1, unsorted_idx) if lstm else c_n
        elif not batched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if lstm else c_n
            cs = cs.squeeze(1) if return_cell_states else cs
        elif self.batch_first:
            out = out.transpose(0, 1)
            cs = cs.transpose(0, 1) if return_cell_states else cs
        state = (h_n, c_n) if lstm else h_n
        if return_cell_states:
            return out, state, cs
        return out, state

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self._mode not in ("lstm", "gru", "tanh"):
            s += f", nonlinearity={self._mode!r}"
        for name, default in (("bias", True), ("batch_first", False),
                              ("bidirectional", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s + f", backend={self.backend!r}"


class RNN(_Recurrent):
    """torch.nn.RNN on fastrnn's kernels: h_t = f(W_ih x_t + b_ih + W_hh
    h_{t-1} + b_hh), f in {tanh, relu, sigmoid}. Same arguments, parameters
    and return values as torch.nn.RNN; `dropout` must be 0."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh",
                 bias=True, batch_first=False, dropout=0.0, bidirectional=False,
                 device=None, dtype=None, *, init="default", seed=None,
                 backend="auto"):
        if nonlinearity not in ("tanh", "relu", "sigmoid"):
            raise ValueError(f"nonlinearity: expected 'tanh', 'relu' or 'sigmoid', "
                             f"got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(nonlinearity, input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype,
                         init, seed, backend)


class LSTM(_Recurrent):
    """torch.nn.LSTM on fastrnn's kernels (gates i, f, g, o). Same arguments,
    parameters and return values as torch.nn.LSTM; `dropout` must be 0 and
    `proj_size` 0. ``forward(x, hx, return_cell_states=True)`` also returns
    the top layer's cell state at every step, shaped like the output."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False,
                 proj_size=0, device=None, dtype=None, *, init="default",
                 seed=None, backend="auto"):
        _check_int("proj_size", proj_size, 0)
        super().__init__("lstm", input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, proj_size, device,
                         dtype, init, seed, backend)


class GRU(_Recurrent):
    """torch.nn.GRU on fastrnn's kernels (gates r, z, n; n = tanh(W_in x +
    b_in + r * (W_hn h + b_hn)), h' = (1 - z) n + z h). Same arguments,
    parameters and return values as torch.nn.GRU; `dropout` must be 0."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False,
                 device=None, dtype=None, *, init="default", seed=None,
                 backend="auto"):
        super().__init__("gru", input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype,
                         init, seed, backend)


class _Cell(_Base):
    """One step: the sequence op with T = 1."""

    def __init__(self, mode, input_size, hidden_size, bias, device, dtype, init,
                 seed, backend):
        super().__init__()
        self.input_size = _check_int("input_size", input_size, 1)
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {type(bias).__name__}")
        self.bias = bias
        self._build(mode, 1, 1, True, device, dtype, init, seed, backend)

    def forward(self, input, hx=None):
        lstm = self._mode == "lstm"
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input: expected a tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2) or input.shape[-1] != self.input_size:
            raise ValueError(f"input: expected shape (B, {self.input_size}) or "
                             f"({self.input_size},), got {tuple(input.shape)}")
        batched = input.dim() == 2
        x = (input if batched else input.unsqueeze(0)).unsqueeze(0)
        B, H = x.shape[1], self.hidden_size
        shape = (B, H) if batched else (H,)
        if hx is None:
            h0 = c0 = None
        else:
            if lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(f"hx: expected a pair (h, c) for LSTMCell, "
                                    f"got {type(hx).__name__}")
                h0 = self._state(hx[0], shape, "hx[0] (h)", x.dtype).reshape(1, B, H)
                c0 = self._state(hx[1], shape, "hx[1] (c)", x.dtype).reshape(1, B, H)
            else:
                h0 = self._state(hx, shape, "hx", x.dtype).reshape(1, B, H)
                c0 = None
        _, h_n, c_n, _ = self._run(x, h0, c0, None, 1, 1)
        h = h_n[0] if batched else h_n[0, 0]
        if lstm:
            return h, (c_n[0] if batched else c_n[0, 0])
        return h

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self._mode not in ("lstm", "gru", "tanh"):
            s += f", nonlinearity={self._mode!r}"
        return s + f", backend={self.backend!r}"


class RNNCell(_Cell):
    """torch.nn.RNNCell on fastrnn's kernels: h' = f(W_ih x + b_ih + W_hh h + b_hh)."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh",
                 device=None, dtype=None, *, init="default", seed=None,
                 backend="auto"):
        if nonlinearity not in ("tanh", "relu", "sigmoid"):
            raise ValueError(f"nonlinearity: expected 'tanh', 'relu' or 'sigmoid', "
                             f"got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(nonlinearity, input_size, hidden_size, bias, device,
                         dtype, init, seed, backend)


class LSTMCell(_Cell):
    """torch.nn.LSTMCell on fastrnn's kernels: (h', c') = cell(x, (h, c))."""

    def __init__(self, input_size, hidden_size, bias=True, device=None,
                 dtype=None, *, init="default", seed=None, backend="auto"):
        super().__init__("lstm", input_size, hidden_size, bias, device, dtype,
                         init, seed, backend)


class GRUCell(_Cell):
    """torch.nn.GRUCell on fastrnn's kernels: h' = cell(x, h), gates (r, z, n)."""

    def __init__(self, input_size, hidden_size, bias=True, device=None,
                 dtype=None, *, init="default", seed=None, backend="auto"):
        super().__init__("gru", input_size, hidden_size, bias, device, dtype,
                         init, seed, backend)
