"""SequenceModel (core + linear read-out + loss), the fused TrainStep, and
gradient_flow.

The model's parameters -- the core's and the read-out's -- live in one flat
buffer, a ParamBuffer (fastrnn/_params.py) extending the core's: the core's
parameters become a view into it, so the layer and the model always agree.
TrainStep keeps the optimizer moments as a HostBuffer of the same length;
forward, loss, BPTT, clipping and the update are one call into the backend.

Threads: a model shares its core's re-entrant lock (layers.py), and every
entry point here -- model forward, TrainStep calls, gradient_flow, the
state_dict functions -- holds it while it reads or writes the parameters,
the optimizer state or the workspaces. One model driven from several threads
is thus serialised: the results equal those of some sequential order of the
calls, and no step is lost. Two models share nothing and run in parallel.
"""
from dataclasses import dataclass

import numpy as np

from . import _dist
from ._params import HasParams, HostBuffer
from ._spec import LOSSES, READOUTS, n_core_params
from ._validate import (check_choice, check_int, check_positive, sequence_args,
                        targets_arg)
from .clip import ClipNorm, ClipValue
from .init import init_readout
from .layers import _Recurrent
from .optim import Optimizer


class SequenceModel(HasParams):
    """A recurrent core (fr.RNN, fr.LSTM or fr.GRU) with a linear read-out.

    z_t = W_out h_t + b_out on the top layer's output h_t (all directions).
    readout="all": a target at every step; "last": one target per sequence,
    from its last valid step. loss: "cross_entropy" (softmax, NLL) or "mse"
    (mean over the O outputs). The loss is the sum over time steps, averaged
    over the batch. Parameters (state_dict): the core's keys (PyTorch
    names) plus weight_out (O, D*H) and bias_out (O,).
    """

    def __init__(self, core, output_size, *, loss="cross_entropy", readout="all",
                 seed=None):
        if not isinstance(core, _Recurrent):
            raise TypeError(f"core: expected an fr.RNN, fr.LSTM or fr.GRU, got {type(core).__name__}")
        self.output_size = check_int("output_size", output_size, lo=1)
        self.loss = check_choice("loss", loss, tuple(LOSSES))
        self.readout = check_choice("readout", readout, tuple(READOUTS))
        self.core = core
        self._spec = core._spec.with_readout(self.output_size, loss, readout)
        self.dtype = core.dtype
        if seed is None and core.seed is not None:
            seed = [core.seed, 1]  # derived, so a seeded core gives a seeded model
        nc = n_core_params(self._spec)

        def init_tail(flat):
            tmp = np.zeros_like(flat, dtype=np.float64)
            init_readout(self._spec, tmp, np.random.default_rng(seed))
            flat[nc:] = tmp[nc:]

        with core._lock:
            # the core now lives inside the model's buffer
            self._pbuf = core._pbuf.extend(self._spec, init_tail)
            core._forget_cache()
        self._ctx = {}

    @property
    def backend(self):
        return self.core.backend

    @property
    def _lock(self):
        """The core's lock: the model and its core are one set of parameters."""
        return self.core._lock

    @property
    def _be(self):
        return self.core._be

    def _forget_cache(self):
        self.core._forget_cache()

    @property
    def _owner_name(self):
        return "SequenceModel"

    def _inputs(self, x, hx, lengths):
        core = self.core
        xs, T, B, ln = sequence_args(x, lengths, core.input_size, self.dtype,
                                     core.batch_first, device=core._device_inputs)
        st0 = core._state0(hx, B)
        return xs, T, B, ln, st0

    def forward(self, x, hx=None, lengths=None):
        """(outputs, h_n): logits/values (T, B, O) for readout 'all' (zero at
        padding steps; (B, T, O) if batch_first) or (B, O) for 'last'.
        Padding steps are ignored whatever x holds there (NaN included)."""
        xs, T, B, ln, st0 = self._inputs(x, hx, lengths)
        with self._lock:
            z, st_n = self._be.model_forward(self._spec, self._params(), xs, ln, st0,
                                             ctx=self._ctx)
        if self.readout == "all" and self.core.batch_first:
            z = np.ascontiguousarray(z.swapaxes(0, 1))
        return z, self.core._state_out(st_n)

    __call__ = forward

    def __repr__(self):
        return (f"SequenceModel({self.core!r}, {self.output_size}, loss={self.loss!r}, "
                f"readout={self.readout!r})")


def _nonfinite_error(optimizer, loss, grad_norm, where=""):
    """The FloatingPointError of a skipped step under on_nonfinite="raise"."""
    if np.isfinite(loss) and np.isfinite(grad_norm):
        why = (f"the {optimizer.kind} update would make a parameter or "
               "optimizer moment non-finite")
    else:
        why = f"non-finite loss ({loss}) or gradient norm ({grad_norm})"
    return FloatingPointError(f"{why}{where}; parameters and optimizer state "
                              "were left unchanged")


@dataclass
class StepResult:
    """What one TrainStep call reports."""
    loss: float          # sum over steps, mean over the batch
    grad_norm: float     # global L2 norm of all parameter gradients, before clipping
    clipped: bool        # whether clipping changed the gradient
    skipped: bool        # non-finite loss/gradient/update: nothing was updated
    hx: object           # final state (h_n, or (h_n, c_n)): pass back for truncated BPTT


class TrainStep:
    """The fused training step: forward, loss, BPTT, clipping and the
    optimizer update in one call into the model's backend.

    clip: None, fr.ClipNorm(max_norm) or fr.ClipValue(limit).
    state_clip: None or c > 0: dL/dh_t is clamped to [-c, c] inside BPTT at
    every step before it propagates further back (the LSTM's cell-state
    gradient is not clamped).
    on_nonfinite: "skip" (report skipped=True, change nothing) or "raise"
    (FloatingPointError, change nothing).
    comm: None or an mpi4py communicator: data-parallel training, each rank
    passing its own batch; one step equals a step on the ranks' batches
    concatenated, results are equal on every rank (see fastrnn/_dist.py).

    A step is atomic: it applies completely or not at all. It is skipped
    when the loss or the gradient is not finite, and also when the update
    itself would make any parameter or optimizer moment non-finite (Adam or
    Adagrad with eps=0 and a gradient that is exactly 0, an overflowing
    momentum, lr=inf): parameters, moments and the step count are then
    bitwise unchanged. Calls from several threads are serialised by the
    model's lock (see the module docstring).
    """

    def __init__(self, model, optimizer, *, clip=None, state_clip=None,
                 on_nonfinite="skip", comm=None):
        if comm is not None:
            _dist.agree(comm, model, optimizer, clip, state_clip, on_nonfinite)
        if not isinstance(model, SequenceModel):
            raise TypeError(f"model: expected an fr.SequenceModel, got {type(model).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected fr.SGD, fr.Adam or fr.Adagrad, "
                            f"got {type(optimizer).__name__}")
        if clip is not None and not isinstance(clip, (ClipNorm, ClipValue)):
            raise TypeError(f"clip: expected None, fr.ClipNorm or fr.ClipValue, "
                            f"got {type(clip).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.clip = clip
        self.state_clip = None if state_clip is None else check_positive("state_clip", state_clip)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("skip", "raise"))
        self._moments = HostBuffer(np.zeros((2, model.num_parameters()), dtype=model.dtype))
        self.steps = 0       # successful updates (Adam's t)
        self._ctx = {}
        self._dist = None if comm is None else _dist.DataParallel(self, comm)

    @property
    def opt_state(self):
        """The optimizer moments, (2, n_params): row 0 momentum / Adam's m /
        Adagrad's sum of squares, row 1 Adam's v; made current (the cuda
        backend keeps them on the device between steps)."""
        return self._moments.write()

    @property
    def _opt(self):
        """The optimizer moments as they are (not made current), for the
        backends, which sync them themselves."""
        return self._moments.raw

    def __call__(self, x, y, hx=None, lengths=None):
        if self._dist is not None:
            return self._dist(x, y, hx, lengths)
        m = self.model
        xs, T, B, ln, st0 = m._inputs(x, hx, lengths)
        yy = targets_arg(y, m._spec, T, B, ln, m.core.batch_first, m.dtype,
                         device=m.core._device_inputs)
        clip = self.clip
        with m._lock:
            # the raw buffers: a backend that keeps them on a device (cuda)
            # syncs them itself through _mirror (see _params.HostBuffer.raw)
            r = m._be.train_step(m._spec, m._buf, self._opt, self.steps + 1, xs, ln,
                                 st0, yy, opt=self.optimizer.kind,
                                 hyper=self.optimizer.hyper,
                                 clip=None if clip is None else clip.kind,
                                 limit=None if clip is None else clip.limit,
                                 state_clip=self.state_clip, ctx=self._ctx)
            if not r["skipped"]:
                self.steps += 1
            m._forget_cache()
        if r["skipped"] and self.on_nonfinite == "raise":
            raise _nonfinite_error(self.optimizer, r["loss"], r["grad_norm"])
        return StepResult(loss=r["loss"], grad_norm=r["grad_norm"],
                          clipped=bool(r["clipped"]) and not r["skipped"],
                          skipped=r["skipped"], hx=m.core._state_out(r["state_n"]))

    step = __call__

    def state_dict(self):
        """Optimizer state (moments and step count) as arrays."""
        with self.model._lock:
            return {"opt_state": self._moments.read().copy(), "steps": self.steps}

    def load_state_dict(self, d):
        st = np.asarray(d["opt_state"])
        if st.shape != self._opt.shape:
            raise ValueError(f"opt_state: expected shape {self._opt.shape}, got {st.shape}")
        with self.model._lock:
            self.opt_state[...] = st
            self.steps = int(d["steps"])


def gradient_flow(model, x, y, hx=None, lengths=None):
    """(T,) array: the L2 norm of dL/dh_t of the top layer at every step (all
    batch rows and directions together): how much of the loss gradient
    reaches each step. Nothing is updated. Holds the model's lock."""
    if not isinstance(model, SequenceModel):
        raise TypeError(f"model: expected an fr.SequenceModel, got {type(model).__name__}")
    xs, T, B, ln, st0 = model._inputs(x, hx, lengths)
    yy = targets_arg(y, model._spec, T, B, ln, model.core.batch_first, model.dtype,
                     device=model.core._device_inputs)
    with model._lock:
        flow = model._be.gradient_flow(model._spec, model._params(), xs, ln, st0, yy,
                                       ctx=model._ctx)
    return np.asarray(flow, dtype=np.float64)
