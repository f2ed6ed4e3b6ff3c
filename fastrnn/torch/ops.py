"""The autograd glue: two torch custom ops over fastrnn's core kernels.

``fastrnn::core_forward`` runs every layer and direction over the whole
sequence in one backend call; ``fastrnn::core_backward`` runs BPTT through
it in one call. They are registered with ``torch.library.custom_op``, with
fake (meta) implementations and ``register_autograd``, so autograd,
``torch.compile`` (no graph break) and ``torch.library.opcheck`` see two
opaque ops.

The forward cache. A backend returns an opaque Python object (workspace
with the gates and states) that its backward needs; custom ops pass
tensors only. The forward op therefore also returns a small int64
*handle* tensor, saved for backward like any activation; the cache lives in
a side table keyed by the address of the handle's storage, and its entry
(and the backend workspace, returned to a pool for the next call) is
released by a weak-reference callback when the handle's storage is freed
(the handle's memory is a NumPy array the table refers to weakly): when autograd
frees the graph (after backward, or when the outputs are dropped), or at
once in inference. So a second forward before the first backward gets its
own workspace (no overwrite), backward with ``retain_graph=True`` can run
twice, and the handle's value (always 0) is the same in eager and compiled
runs (opcheck compares them). Recomputing the forward inside backward would
have avoided the table at the price of a third more kernel time.

Eager calls go through ``_Eager``, a plain autograd.Function over the same
two implementations (through the custom op's Python autograd wrapper an
LSTM forward+backward at T=B=H=1 took 493 us, through _Eager 122 us);
compiled code calls the custom ops.

Parameters reach the kernels as one flat array: when the parameter tensors
are consecutive views of one buffer (the modules keep them so), that buffer
is used in place; otherwise they are gathered into one (a copy of the
parameters, small beside the step). CPU tensors are read through
``.numpy()`` views, without copies.
"""
import functools
import weakref
from typing import List, Optional, Tuple

import numpy as np
import torch

from fastrnn import backends
from fastrnn._spec import make_spec

Tensor = torch.Tensor

_TABLE = {}    # handle address -> (backend, spec, cache, ctx, pool key, flat,
#                                  T, B, weakref)
_POOL = {}     # (backend, spec, dtype) -> free ctx dicts (backend workspaces)


@functools.lru_cache(maxsize=256)
def _spec(mode, I, H, L, D, bias, cell):
    return make_spec(mode, I, H, L, D, bias, cell=cell)


def _flat_params(params):
    """One contiguous 1-D tensor holding the parameters in order: the
    common buffer when they are consecutive views of it, else a copy."""
    p0 = params[0]
    size = p0.element_size()
    addr = p0.data_ptr()
    n = 0
    for p in params:
        # consecutive, contiguous and of one dtype: together one block of
        # memory, which is p0's storage when that is large enough
        if (p.data_ptr() != addr + n * size or not p.is_contiguous()
                or p.dtype != p0.dtype):
            return torch.cat([q.detach().reshape(-1) for q in params])
        n += p.numel()
    off = p0.storage_offset()
    if p0.untyped_storage().nbytes() >= (off + n) * size:
        return p0.detach().as_strided((n,), (1,), off)
    return torch.cat([q.detach().reshape(-1) for q in params])


def _np(t):
    """A NumPy view of a CPU tensor (contiguous first, once, if needed)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


def _take_ctx(key):
    free = _POOL.setdefault(key, [])
    return free.pop() if free else {}


def _release(addr):
    entry = _TABLE.pop(addr, None)
    if entry is not None:
        ctx, key = entry[3], entry[4]
        _POOL.setdefault(key, []).append(ctx)


def _new_handle(entry):
    """An int64 tensor (value 0) whose storage keys `entry` in the table
    for as long as the storage lives."""
    arr = np.zeros(1, dtype=np.int64)
    t = torch.from_numpy(arr)
    addr = t.data_ptr()
    # a plain weak reference kept in the entry (weakref.finalize took
    # ~50 us a call here); its callback runs when the array is freed
    _TABLE[addr] = entry + (weakref.ref(arr, lambda _, a=addr: _release(a)),)
    return t


def _check_device(t, what):
    if t.device.type != "cpu":
        raise NotImplementedError(
            f"fastrnn.torch: {what} is on {t.device}; only CPU tensors are "
            "supported so far (the cuda backend takes NumPy/numba arrays)")


def _forward_impl(x, params, h0, c0, lengths, mode, hidden_size, num_layers,
                  num_directions, bias, cell, backend, cells):
    """x (T, B, I) time-major; params in the spec's order; h0, c0
    (L*D, B, H) or None (zeros; c0 unused by the RNN); lengths (B,) int64
    or None (all T steps valid).
    Returns out (T, B, D*H), h_n, c_n (empty for the RNN), c_seq
    (T, B, D*H) of the top layer when `cells` (else empty), handle."""
    _check_device(x, "input")
    T, B, I = x.shape
    spec = _spec(mode, I, hidden_size, num_layers, num_directions, bias, cell)
    flat = _np(_flat_params(params))
    lstm = mode == "lstm"
    shape = (num_layers * num_directions, B, hidden_size)
    state0 = np.zeros((2 if lstm else 1,) + shape, dtype=flat.dtype)
    if h0 is not None:
        state0[0] = _np(h0)
    if lstm and c0 is not None:
        state0[1] = _np(c0)
    ln = (np.full(B, T, dtype=np.int64) if lengths is None
          else np.ascontiguousarray(_np(lengths), dtype=np.int64))
    be = backends.get(backend)
    key = (backend, spec, flat.dtype)
    ctx = _take_ctx(key)
    try:
        out, st_n, cache = be.core_forward(spec, flat, _np(x), ln, state0,
                                           ctx=ctx)
    except BaseException:
        _POOL[key].append(ctx)
        raise
    handle = _new_handle((be, spec, cache, ctx, key, flat, T, B))
    cs = (torch.from_numpy(be.top_cells(spec, cache)) if cells
          else x.new_empty(0))
    c_n = torch.from_numpy(st_n[1]) if lstm else x.new_empty(0)
    return torch.from_numpy(out), torch.from_numpy(st_n[0]), c_n, cs, handle


@torch.library.custom_op("fastrnn::core_forward", mutates_args=())
def core_forward(x: Tensor, params: List[Tensor], h0: Optional[Tensor],
                 c0: Optional[Tensor],
                 lengths: Optional[Tensor], mode: str, hidden_size: int,
                 num_layers: int, num_directions: int, bias: bool, cell: bool,
                 backend: str, cells: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole-sequence forward (see _forward_impl)."""
    return _forward_impl(x, params, h0, c0, lengths, mode, hidden_size,
                         num_layers, num_directions, bias, cell, backend, cells)


@core_forward.register_fake
def _(x, params, h0, c0, lengths, mode, hidden_size, num_layers,
      num_directions, bias, cell, backend, cells):
    T, B, _ = x.shape
    DH = num_directions * hidden_size
    shape = (num_layers * num_directions, B, hidden_size)
    out = x.new_empty((T, B, DH))
    h_n = x.new_empty(shape)
    c_n = x.new_empty(shape) if mode == "lstm" else x.new_empty(0)
    cs = x.new_empty((T, B, DH)) if cells else x.new_empty(0)
    return out, h_n, c_n, cs, x.new_empty(1, dtype=torch.int64)


def _backward_impl(handle, params, dout, dh_n, dc_n, dcs, want_dx):
    """BPTT through the forward call that made `handle`; dout, dh_n, dc_n
    may be None (zero; _Eager does not materialise them). Returns dx
    (T, B, I) (empty unless want_dx), dflat (all parameters, flat), dh0,
    dc0 (empty for the RNN)."""
    entry = _TABLE.get(handle.data_ptr())
    if entry is None:
        raise RuntimeError("fastrnn::core_backward: the forward call's cache is "
                           "gone (its handle was freed)")
    # the flat parameters the forward read (the same memory as `params`,
    # whose version counters autograd checked when it unpacked them)
    be, spec, cache, ctx, _, flat, T, B, _ = entry
    lstm = spec.mode == "lstm"
    dst = np.zeros((2 if lstm else 1, spec.L * spec.D, B, spec.H), dtype=flat.dtype)
    if dh_n is not None:
        dst[0] = _np(dh_n)
    if lstm and dc_n is not None:
        dst[1] = _np(dc_n)
    dout = (np.zeros((T, B, spec.D * spec.H), dtype=flat.dtype) if dout is None
            else _np(dout))
    dx, dst0, grad, _ = be.core_backward(
        spec, flat, cache, dout, dst, None, ctx=ctx,
        dcs=None if dcs is None else _np(dcs))
    empty = torch.from_numpy(flat[:0])
    dxt = torch.from_numpy(dx) if want_dx else empty
    dc0 = torch.from_numpy(dst0[1]) if lstm else empty
    return dxt, torch.from_numpy(grad), torch.from_numpy(dst0[0]), dc0


@torch.library.custom_op("fastrnn::core_backward", mutates_args=())
def core_backward(handle: Tensor, params: List[Tensor], dout: Tensor,
                  dh_n: Tensor, dc_n: Tensor, dcs: Optional[Tensor],
                  want_dx: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """BPTT through the forward call that made `handle` (see _backward_impl)."""
    return _backward_impl(handle, params, dout, dh_n, dc_n, dcs, want_dx)


@core_backward.register_fake
def _(handle, params, dout, dh_n, dc_n, dcs, want_dx):
    n = sum(p.numel() for p in params)
    I = params[0].shape[1]
    T, B = dout.shape[0], dout.shape[1]
    dx = dout.new_empty((T, B, I)) if want_dx else dout.new_empty(0)
    dc0 = dout.new_empty(dh_n.shape) if dc_n.numel() else dout.new_empty(0)
    return dx, dout.new_empty(n), dout.new_empty(dh_n.shape), dc0


def _setup_context(ctx, inputs, output):
    x, params, h0, c0, lengths, mode, *_, cells = inputs
    ctx.lstm = mode == "lstm"
    ctx.cells = cells
    ctx.shapes = [p.shape for p in params]
    ctx.want_dx = x.requires_grad
    ctx.h0, ctx.c0 = h0 is not None, _lstm_c0(mode, c0)
    ctx.save_for_backward(output[4], *params)


def _lstm_c0(mode, c0):
    """Whether an LSTM's c0 was given (and gets a gradient)."""
    return mode == "lstm" and c0 is not None


def _backward(ctx, dout, dh_n, dc_n, dcs, _dhandle):
    # grads of unused outputs arrive as zeros (autograd materialises them)
    handle, *params = ctx.saved_tensors
    dx, dflat, dh0, dc0 = core_backward(
        handle, params, dout, dh_n, dc_n, dcs if ctx.cells else None,
        ctx.want_dx)
    grads = [g.view(s) for g, s in
             zip(dflat.split([p.numel() for p in params]), ctx.shapes)]
    return (dx if ctx.want_dx else None, grads, dh0 if ctx.h0 else None,
            dc0 if ctx.c0 else None, None, None, None, None, None, None,
            None, None, None)


core_forward.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastrnn.torch: double backward (a gradient of a "
                       "gradient, create_graph=True) is not supported")


def _setup_nothing(ctx, inputs, output):
    pass


core_backward.register_autograd(_no_double_backward,
                                setup_context=_setup_nothing)


class _Eager(torch.autograd.Function):
    """The same two calls for eager mode through a plain autograd.Function
    (see the opening paragraph). Under torch.compile the modules call the
    custom ops instead (core_forward / core_backward)."""

    @staticmethod
    def forward(ctx, x, h0, c0, lengths, meta, *params):
        mode, H, L, D, bias, cell, backend, cells = meta
        res = _forward_impl(x, params, h0, c0, lengths, mode, H, L, D, bias,
                            cell, backend, cells)
        ctx.lstm, ctx.cells = mode == "lstm", cells
        ctx.shapes = [p.shape for p in params]
        ctx.want_dx = x.requires_grad
        ctx.h0, ctx.c0 = h0 is not None, _lstm_c0(mode, c0)
        ctx.mark_non_differentiable(res[4])
        ctx.save_for_backward(res[4], *params)
        ctx.set_materialize_grads(False)
        ctx.out_meta = [(o.shape, o.dtype) for o in res[:3]]   # no cycle
        return res

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n, dcs, _dhandle):
        handle, *params = ctx.saved_tensors
        dcs = dcs if ctx.cells else None
        if torch.is_grad_enabled():
            # create_graph=True: record the op, whose own backward raises
            # the double-backward error; it takes tensors, not None
            dout, dh_n, dc_n = [torch.zeros(shape, dtype=dt) if v is None else v
                                for v, (shape, dt) in zip((dout, dh_n, dc_n),
                                                          ctx.out_meta)]
            fn = core_backward
        else:
            fn = _backward_impl
        dx, dflat, dh0, dc0 = fn(handle, params, dout, dh_n, dc_n, dcs,
                                 ctx.want_dx)
        grads = [g.view(s) for g, s in
                 zip(dflat.split([p.numel() for p in params]), ctx.shapes)]
        return (dx if ctx.want_dx else None, dh0 if ctx.h0 else None,
                dc0 if ctx.c0 else None, None, None, *grads)


# eager calls go through _Eager (False: through the custom ops, as compiled
# code does; the tests run both)
EAGER_FUNCTION = True


def run(x, params, h0, c0, lengths, mode, H, L, D, bias, cell, backend, cells):
    """out, h_n, c_n, c_seq, handle of one whole-sequence call, recorded for
    autograd: through the custom op when compiling (or EAGER_FUNCTION is
    False), else through _Eager."""
    if EAGER_FUNCTION and not torch.compiler.is_compiling():
        return _Eager.apply(x, h0, c0, lengths,
                            (mode, H, L, D, bias, cell, backend, cells), *params)
    return torch.ops.fastrnn.core_forward(x, params, h0, c0, lengths, mode, H,
                                          L, D, bias, cell, backend, cells)
