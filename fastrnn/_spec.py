"""Network specification and the flat parameter layout shared by all backends.

All parameters of a core (and of a SequenceModel's read-out) live in one
contiguous 1-D array. ``Spec`` records the dimensions and where each named
parameter (PyTorch's names) sits in that array. Backends receive a Spec and
the flat array; nothing else needs to know the layout.
"""
from dataclasses import dataclass, field

import numpy as np

# cell modes (also the integer code handed to compiled kernels)
MODES = {"tanh": 0, "relu": 1, "sigmoid": 2, "lstm": 3, "gru": 4}
MODE_NAMES = {v: k for k, v in MODES.items()}

# readout / loss codes
READOUTS = {"all": 0, "last": 1}
LOSSES = {"cross_entropy": 0, "mse": 1}


@dataclass(frozen=True)
class Spec:
    """Dimensions of a recurrent core (+ optional linear read-out).

    mode: "tanh" | "relu" | "sigmoid" | "lstm" | "gru"
    I: input size, H: hidden size, L: layers, D: directions (1 or 2),
    bias: whether bias_ih/bias_hh exist, O: read-out size (0: no read-out),
    suffix: parameter-name suffix style ("layer" -> weight_ih_l0, "cell" ->
    weight_ih).
    """
    mode: str
    I: int
    H: int
    L: int = 1
    D: int = 1
    bias: bool = True
    O: int = 0
    loss: str = "cross_entropy"
    readout: str = "all"
    cell: bool = False
    layout: dict = field(default=None, compare=False, hash=False, repr=False)

    @property
    def G(self):
        """Gate blocks per layer: 4 for the LSTM (i, f, g, o), 3 for the GRU
        (r, z, n), 1 for the Elman RNN."""
        return {"lstm": 4, "gru": 3}.get(self.mode, 1)

    @property
    def S(self):
        """Number of state tensors: (h,) (RNN, GRU) or (h, c) (LSTM)."""
        return 2 if self.mode == "lstm" else 1

    def input_size(self, k):
        return self.I if k == 0 else self.D * self.H

    def names(self, k, d):
        """Parameter names of layer k, direction d (PyTorch's names)."""
        if self.cell:
            sfx = ""
        else:
            sfx = f"_l{k}" + ("_reverse" if d == 1 else "")
        names = [f"weight_ih{sfx}", f"weight_hh{sfx}"]
        if self.bias:
            names += [f"bias_ih{sfx}", f"bias_hh{sfx}"]
        return names

    def with_readout(self, O, loss, readout):
        return make_spec(self.mode, self.I, self.H, self.L, self.D, self.bias,
                         O=O, loss=loss, readout=readout, cell=self.cell)


def make_spec(mode, I, H, L=1, D=1, bias=True, *, O=0, loss="cross_entropy",
              readout="all", cell=False):
    """Build a Spec with its layout: name -> (offset, shape), in PyTorch's
    state_dict order, read-out last."""
    s = Spec(mode, int(I), int(H), int(L), int(D), bool(bias), int(O), loss,
             readout, bool(cell))
    G, H = s.G, s.H
    layout = {}
    off = 0
    poff = np.full((s.L * s.D, 4), -1, dtype=np.int64)
    for k in range(s.L):
        for d in range(s.D):
            shapes = [(G * H, s.input_size(k)), (G * H, H)]
            if s.bias:
                shapes += [(G * H,), (G * H,)]
            for j, (name, shape) in enumerate(zip(s.names(k, d), shapes)):
                layout[name] = (off, shape)
                poff[k * s.D + d, j] = off
                off += int(np.prod(shape))
    n_core = off
    if s.O:
        layout["weight_out"] = (off, (s.O, s.D * H))
        off += s.O * s.D * H
        layout["bias_out"] = (off, (s.O,))
        off += s.O
    object.__setattr__(s, "layout", layout)
    object.__setattr__(s, "_poff", poff)
    object.__setattr__(s, "_n_core", n_core)
    object.__setattr__(s, "_n_total", off)
    return s


def n_params(spec):
    return spec._n_total


def n_core_params(spec):
    return spec._n_core


def param_offsets(spec):
    """(L*D, 4) int64: offsets of weight_ih, weight_hh, bias_ih, bias_hh of
    each layer/direction in the flat buffer (-1 where absent)."""
    return spec._poff


def out_offsets(spec):
    """Offsets of weight_out and bias_out (-1 when there is no read-out)."""
    if not spec.O:
        return -1, -1
    return spec.layout["weight_out"][0], spec.layout["bias_out"][0]


def views(spec, flat):
    """Named views into a flat buffer: dict name -> ndarray view."""
    return {name: flat[off:off + int(np.prod(shape))].reshape(shape)
            for name, (off, shape) in spec.layout.items()}
