"""Data-parallel training over MPI: what ``fr.TrainStep(..., comm=)`` does.

Every rank holds a full copy of the model and passes its own batch of B_r
rows. A step is the backend's train_step cut in two (backends/__init__.py):

    train_grad    forward, loss (mean over the B_r rows) and BPTT, locally
    Allreduce     one sum over the ranks of [B_r*grad_r, B_r*loss_r, B_r,
                  failures, failed rank] in one flat buffer of the model's
                  dtype: the totals divided by B = sum_r B_r are the gradient
                  and the loss of the concatenated batch
    apply_update  norm, non-finite guard, clipping and the optimizer update,
                  the same compiled code on every rank on the same numbers

so every rank ends the step with the same parameters, optimizer state and
StepResult (loss, grad_norm, clipped, skipped); only ``hx`` is the rank's
own. A NaN or inf on any rank makes the sums non-finite (IEEE arithmetic
propagates them), so the guard skips the step on every rank. A rank whose
own part of the step raises still takes part in the Allreduce (with a
failure count), so every rank raises instead of waiting for ever; an
exception nobody catches aborts the job (MPI_Abort) for the same reason.

When the TrainStep is built the ranks first compare a signature of the
model, optimizer and clipping (allgather: every rank refuses a mismatch with
the same message), then take rank 0's parameters, optimizer state and step
count (Bcast).
"""
import sys
import time

import numpy as np

_COMM_METHODS = ("Allreduce", "Bcast", "allgather", "bcast", "Get_rank",
                 "Get_size", "Abort")


def check_comm(comm):
    """comm must be an mpi4py intra-communicator."""
    missing = [n for n in _COMM_METHODS if not hasattr(comm, n)]
    if missing:
        raise TypeError(f"comm: expected an mpi4py communicator (e.g. MPI.COMM_WORLD), "
                        f"got {type(comm).__name__} (it lacks {', '.join(missing)})")
    try:
        from mpi4py import MPI
    except ImportError:
        return
    if comm == MPI.COMM_NULL:
        raise ValueError("comm: got MPI.COMM_NULL; expected a communicator this rank "
                         "belongs to")
    if comm.Is_inter():
        raise ValueError("comm: expected an intra-communicator, got an inter-communicator")


def _signature(model, optimizer, clip, state_clip, on_nonfinite):
    """What must be the same on every rank, as (name, value) pairs."""
    from .model import SequenceModel
    sig = [("model", type(model).__name__)]
    if isinstance(model, SequenceModel):
        sp, core = model._spec, model.core
        sig += [("cell", f"{type(core).__name__}/{sp.mode}"), ("input_size", sp.I),
                ("hidden_size", sp.H), ("num_layers", sp.L),
                ("bidirectional", sp.D == 2), ("bias", sp.bias),
                ("output_size", sp.O), ("loss", sp.loss), ("readout", sp.readout),
                ("dtype", np.dtype(model.dtype).name),
                ("dropout", getattr(core, "dropout", 0.0)),
                ("parameter layout", tuple((k, off, tuple(shape)) for k, (off, shape)
                                           in sp.layout.items()))]
    sig += [("optimizer", type(optimizer).__name__),
            ("optimizer settings", tuple(sorted(getattr(optimizer, "hyper", {}).items()))),
            ("clip", repr(clip)), ("state_clip", repr(state_clip)),
            ("on_nonfinite", repr(on_nonfinite))]
    return sig


def agree(comm, model, optimizer, clip, state_clip, on_nonfinite):
    """Refuse, on every rank with the same message, ranks whose model,
    optimizer or clipping differ from rank 0's (parameter values may
    differ: rank 0's are broadcast afterwards)."""
    check_comm(comm)
    try:
        mine = (_signature(model, optimizer, clip, state_clip, on_nonfinite), None)
    except Exception as e:   # a signature that cannot be read: refused below
        mine = (None, f"{type(e).__name__}: {e}")
    every = comm.allgather(mine)
    for r, (_, err) in enumerate(every):
        if err is not None:
            raise ValueError(f"comm: rank {r} could not describe its model: {err}")
    ref = dict(every[0][0])
    for r, (sig, _) in enumerate(every[1:], start=1):
        for name, value in sig:
            if ref.get(name) != value:
                shown = "differs" if name == "parameter layout" else \
                    f"{value!r} on rank {r}, {ref.get(name)!r} on rank 0"
                raise ValueError(f"comm: the ranks' models differ: {name}: {shown}; "
                                 "every rank must build the same model, optimizer "
                                 "and clipping")


def attach(step, comm):
    """Make an existing TrainStep data-parallel over comm (as if built with
    comm=): the same checks, then rank 0's state everywhere."""
    agree(comm, step.model, step.optimizer, step.clip, step.state_clip,
          step.on_nonfinite)
    step._dist = DataParallel(step, comm)
    return step


_abort_hooked = []


def _abort_on_uncaught(comm):
    """An exception nobody catches on one rank would leave the others
    waiting in the next collective for ever: print it, then MPI_Abort."""
    if _abort_hooked:
        return
    prev = sys.excepthook

    def hook(kind, value, tb):
        prev(kind, value, tb)
        sys.stderr.write(f"fastrnn: rank {comm.Get_rank()} of {comm.Get_size()} "
                         f"stopped on {kind.__name__}; aborting every rank "
                         "(MPI_Abort) so that none waits for it\n")
        sys.stderr.flush()
        # MPI_Abort ends every process at once: give the launcher's output
        # forwarding a moment, or the traceback above may never be shown
        time.sleep(0.5)
        comm.Abort(1)

    sys.excepthook = hook
    _abort_hooked.append(comm)


class DataParallel:
    """The distributed half of a TrainStep (step._dist)."""

    def __init__(self, step, comm):
        self.step = step
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._buf = None
        from mpi4py import MPI
        self._in_place = MPI.IN_PLACE
        _abort_on_uncaught(comm)
        self.broadcast()

    def broadcast(self, root=0):
        """Every rank takes root's parameters, optimizer state and step
        count (also after root alone loaded a checkpoint)."""
        st = self.step
        self.comm.Bcast(st.model._flat, root=root)
        self.comm.Bcast(st.opt_state, root=root)
        st.steps = self.comm.bcast(st.steps, root=root)
        st.model._forget_cache()

    def __call__(self, x, y, hx=None, lengths=None):
        with self.step.model._lock:   # one thread at a time, as TrainStep
            return self._call(x, y, hx, lengths)

    def _call(self, x, y, hx, lengths):
        from ._validate import targets_arg
        from .model import StepResult, _nonfinite_error
        st = self.step
        m = st.model
        P = m._buf.size
        if self._buf is None or self._buf.dtype != m.dtype or self._buf.size != P + 4:
            self._buf = np.empty(P + 4, dtype=m.dtype)
        buf = self._buf
        fail = None
        try:
            xs, T, B, ln, st0 = m._inputs(x, hx, lengths)
            yy = targets_arg(y, m._spec, T, B, ln, m.core.batch_first, m.dtype,
                             device=m.core._device_inputs)
            r = m._be.train_grad(m._spec, m._buf, xs, ln, st0, yy,
                                 state_clip=st.state_clip, ctx=st._ctx)
            np.multiply(r["grad"], B, out=buf[:P])
            buf[P:] = (r["loss"] * B, B, 0, 0)
        except Exception as e:
            fail = e
            buf[:] = 0
            buf[P + 2:] = (1, self.rank)
        self.comm.Allreduce(self._in_place, buf)
        nfail = int(buf[P + 2])
        if nfail:
            if fail is not None:
                raise fail
            who = f"rank {int(buf[P + 3])}" if nfail == 1 else f"{nfail} ranks"
            raise RuntimeError(f"TrainStep: {who} failed in this step (see its error); "
                               "parameters and optimizer state were left unchanged "
                               "on every rank")
        n = buf[P + 1]
        grad = buf[:P]
        grad /= n
        loss = float(buf[P]) / float(n)
        u = m._be.apply_update(m._spec, m._buf, st._opt, st.steps + 1, grad, loss,
                               opt=st.optimizer.kind, hyper=st.optimizer.hyper,
                               clip=None if st.clip is None else st.clip.kind,
                               limit=None if st.clip is None else st.clip.limit,
                               ctx=st._ctx)
        if u["skipped"]:
            if st.on_nonfinite == "raise":
                raise _nonfinite_error(st.optimizer, loss, u["grad_norm"],
                                       " over the ranks' batches (on every rank)")
        else:
            st.steps += 1
        m._forget_cache()
        return StepResult(loss=loss, grad_norm=u["grad_norm"],
                          clipped=bool(u["clipped"]) and not u["skipped"],
                          skipped=u["skipped"], hx=m.core._state_out(r["state_n"]))
