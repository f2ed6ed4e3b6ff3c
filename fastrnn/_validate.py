"""Argument validation: every check raises ValueError/TypeError naming the
argument, what was expected and what was received, before any kernel runs.

What comes back is what the backends may rely on: contiguous arrays of the
model's dtype that are writable (a read-only input -- np.load(...,
mmap_mode="r"), writeable=False -- is copied, never written) and, for a
float sequence with padding, padding steps that hold no NaN or inf (padding
carries nothing, so non-finite junk there is zeroed, in a copy).
"""
import math
import numbers

import numpy as np


def check_int(name, v, lo=None):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    v = int(v)
    if lo is not None and v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    return v


def check_bool(name, v):
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__} {v!r}")
    return bool(v)


def check_choice(name, v, choices):
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {v!r}")
    return v


def check_positive(name, v, allow_zero=False):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__} {v!r}")
    v = float(v)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        cond = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {cond}, got {v!r}")
    return v


def check_range(name, v, lo=0.0, hi=math.inf, hi_open=False):
    """A real number in [lo, hi] ([lo, hi) with hi_open); NaN is refused,
    infinities are accepted where the interval reaches them (PyTorch's
    ranges for the optimizers and clips)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__} {v!r}")
    v = float(v)
    if math.isnan(v) or v < lo or v > hi or (hi_open and v == hi):
        top = f"{hi})" if hi_open else ("inf]" if hi == math.inf else f"{hi}]")
        raise ValueError(f"{name}: expected a number in [{lo}, {top}, got {v!r}")
    return v


def check_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected np.float32 or np.float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype: expected np.float32 or np.float64, got {dt}")
    return dt


def is_device_array(v):
    """Whether v is a CUDA device array (numba, CuPy, a torch CUDA tensor:
    anything exporting __cuda_array_interface__)."""
    if isinstance(v, np.ndarray):
        return False
    try:
        return (getattr(v, "__cuda_ndarray__", False) is True   # numba (and its simulator)
                or hasattr(v, "__cuda_array_interface__"))
    except Exception:   # a property that raises for host tensors
        return False


class DeviceSeq:
    """A validated device array that a device backend reads in place
    (backends/cuda.py): ``array`` seen as ``shape`` (time-major), converted to
    ``dtype`` on the device; axes 0 and 1 of ``array`` are swapped first when
    ``swap`` (batch_first)."""

    def __init__(self, array, shape, dtype, swap):
        self.array = array
        self.shape = tuple(int(v) for v in shape)
        self.dtype = np.dtype(dtype)
        self.swap = bool(swap)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape))

    def __repr__(self):
        return f"DeviceSeq(shape={self.shape}, dtype={self.dtype}, swap={self.swap})"


def _device_meta(name, v):
    """(shape, dtype) of a device array (numba's, or from its
    __cuda_array_interface__)."""
    if getattr(v, "__cuda_ndarray__", False) is True:
        return tuple(int(n) for n in v.shape), np.dtype(v.dtype)
    try:
        cai = v.__cuda_array_interface__
        return tuple(int(n) for n in cai["shape"]), np.dtype(cai["typestr"])
    except Exception as e:
        raise TypeError(f"{name}: cannot read the device array's "
                        f"__cuda_array_interface__ ({type(e).__name__}: {e})") from None


def _to_host(v):
    """Host copy of a device array (for backends that compute on the host)."""
    if hasattr(v, "detach") and hasattr(v, "cpu"):     # torch
        return v.detach().cpu().numpy()
    if hasattr(v, "copy_to_host"):                      # numba
        return v.copy_to_host()
    if hasattr(v, "get"):                               # CuPy
        return v.get()
    from numba import cuda
    return cuda.as_cuda_array(v).copy_to_host()


def as_array(name, v):
    """NumPy array from an array, anything with __array__, a torch tensor, or
    a CUDA device array (copied to the host)."""
    if is_device_array(v):
        v = _to_host(v)
    if hasattr(v, "detach") and hasattr(v, "cpu"):
        v = v.detach().cpu().numpy()
    try:
        return np.asarray(v)
    except Exception as e:
        raise TypeError(f"{name}: expected an array, got {type(v).__name__} ({e})") from None


def sequence_input(x, input_size, dtype, batch_first, name="x", device=False):
    """Validate a sequence input. Returns a time-major array: (T, B, I) of
    `dtype`, or (T, B) int64 token ids checked to lie in [0, input_size).
    With device=True (a backend that reads device arrays in place) a device
    array is checked by its shape and dtype only and comes back as a
    DeviceSeq; the backend checks the ids on the device."""
    layout = "(B, T" if batch_first else "(T, B"
    if device and is_device_array(x):
        shape, dt = _device_meta(name, x)
        if dt.kind in "iu":
            if len(shape) != 2:
                raise ValueError(f"{name}: integer token ids must have shape {layout}), "
                                 f"got shape {shape}")
            out = np.int64
        elif dt.kind == "f":
            if len(shape) != 3 or shape[2] != input_size:
                raise ValueError(f"{name}: expected shape {layout}, {input_size}) "
                                 f"(input_size={input_size}), got shape {shape}")
            out = dtype
        else:
            raise TypeError(f"{name}: expected a float array or integer token ids, "
                            f"got dtype {dt}")
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"{name}: expected non-empty T and B, got shape {shape}")
        if batch_first:
            shape = (shape[1], shape[0]) + shape[2:]
        return DeviceSeq(x, shape, out, batch_first)
    x = as_array(name, x)
    if x.dtype.kind in "iu":
        if x.ndim != 2:
            raise ValueError(f"{name}: integer token ids must have shape {layout}), "
                             f"got shape {x.shape}")
        _check_ids(name, x, input_size)
        x = x.astype(np.int64, copy=False)
    elif x.dtype.kind == "f":
        if x.ndim != 3 or x.shape[2] != input_size:
            raise ValueError(f"{name}: expected shape {layout}, {input_size}) "
                             f"(input_size={input_size}), got shape {x.shape}")
        x = x.astype(dtype, copy=False)
    else:
        raise TypeError(f"{name}: expected a float array or integer token ids, "
                        f"got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected non-empty T and B, got shape {x.shape}")
    if batch_first:
        x = x.swapaxes(0, 1)
    return _writable(np.ascontiguousarray(x))


def _writable(a):
    """a, or a copy of it when it is read-only: the backends may hand it to
    compiled code that is typed for writable arrays, and never write it."""
    return a if a.flags.writeable else a.copy()


def sequence_args(x, lengths, input_size, dtype, batch_first, device=False):
    """x validated as in sequence_input, and lengths as in lengths_arg.
    Returns (xs, T, B, ln); NaN or inf at the padding steps of a float xs
    is zeroed (in a copy), so that padding carries nothing, finite or not."""
    xs = sequence_input(x, input_size, dtype, batch_first, device=device)
    T, B = xs.shape[0], xs.shape[1]
    ln = lengths_arg(lengths, T, B)
    return _clean_padding(xs, ln), T, B, ln


def _clean_padding(xs, ln):
    if (isinstance(xs, DeviceSeq) or xs.dtype.kind != "f" or ln.min() >= xs.shape[0]
            or np.isfinite(xs).all()):
        return xs
    pad = np.arange(xs.shape[0])[:, None] >= ln[None, :]
    return np.where(pad[:, :, None], xs.dtype.type(0), xs)


def _check_ids(name, ids, n):
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        bad = ids[(ids < 0) | (ids >= n)].ravel()[0]
        raise ValueError(f"{name}: token ids must be in [0, {n}) (input_size), "
                         f"got {int(bad)}")


def lengths_arg(lengths, T, B, name="lengths"):
    """(B,) int64 lengths in [1, T]; None -> all T."""
    if lengths is None:
        return np.full(B, T, dtype=np.int64)
    ln = as_array(name, lengths)
    if ln.dtype.kind not in "iu":
        if ln.dtype.kind == "f" and ln.size and np.all(np.isfinite(ln)) and np.all(ln == np.round(ln)):
            pass
        else:
            raise TypeError(f"{name}: expected integers, got dtype {ln.dtype}")
    if ln.shape != (B,):
        raise ValueError(f"{name}: expected shape ({B},) (one length per batch row), "
                         f"got shape {ln.shape}")
    ln = ln.astype(np.int64)
    if ln.size and (ln.min() < 1 or ln.max() > T):
        bad = ln[(ln < 1) | (ln > T)][0]
        raise ValueError(f"{name}: expected values in [1, {T}] (T={T}), got {int(bad)}")
    return ln


def state_arg(v, shape, dtype, name):
    """An initial state (or state gradient) of exactly `shape`, cast to dtype."""
    v = as_array(name, v)
    if v.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a float array, got dtype {v.dtype}")
    if v.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {v.shape}")
    return _writable(np.ascontiguousarray(v, dtype=dtype))


def targets_arg(y, spec, T, B, lengths, batch_first, dtype, name="y", device=False):
    """Targets for the read-out, time-major. cross_entropy: int class ids,
    (T, B) for readout 'all' or (B,) for 'last'; mse: floats with a trailing
    O axis. Ids are checked at valid steps (padding targets are ignored).
    device=True: as in sequence_input (a DeviceSeq; ids checked on the
    device, after the padding ones are zeroed)."""
    if device and is_device_array(y):
        return _device_targets(y, spec, T, B, batch_first, dtype, name)
    y = as_array(name, y)
    O = spec.O
    if spec.readout == "all":
        lay = "(B, T" if batch_first else "(T, B"
        shape = (B, T) if batch_first else (T, B)
    else:
        lay, shape = "(B", (B,)
    if spec.loss == "cross_entropy":
        if y.dtype.kind not in "iu":
            raise TypeError(f"{name}: cross_entropy expects integer class ids, got dtype {y.dtype}")
        if y.shape != shape:
            raise ValueError(f"{name}: expected class ids of shape {lay}) = {shape}, got {y.shape}")
        if batch_first and spec.readout == "all":
            y = y.T
        y = np.ascontiguousarray(y, dtype=np.int64)
        if spec.readout == "all":
            valid = np.arange(T)[:, None] < lengths[None, :]
            yv = y[valid]
        else:
            yv = y
        if yv.size and (yv.min() < 0 or yv.max() >= O):
            bad = yv[(yv < 0) | (yv >= O)][0]
            raise ValueError(f"{name}: class ids must be in [0, {O}) (output_size), got {int(bad)}")
        if spec.readout == "all":
            y = np.where(valid, y, 0)
        return _writable(y)
    if y.dtype.kind not in "fiu":
        raise TypeError(f"{name}: mse expects float targets, got dtype {y.dtype}")
    fshape = shape + (O,)
    if y.shape != fshape:
        raise ValueError(f"{name}: expected float targets of shape {lay}, {O}) = {fshape}, got {y.shape}")
    if batch_first and spec.readout == "all":
        y = y.swapaxes(0, 1)
    return _writable(np.ascontiguousarray(y, dtype=dtype))


def _device_targets(y, spec, T, B, batch_first, dtype, name):
    shape, dt = _device_meta(name, y)
    O = spec.O
    every = spec.readout == "all"
    if every:
        lay = "(B, T" if batch_first else "(T, B"
        want = (B, T) if batch_first else (T, B)
    else:
        lay, want = "(B", (B,)
    swap = batch_first and every
    tm = lambda s: (s[1], s[0]) + s[2:] if swap else s   # noqa: E731
    if spec.loss == "cross_entropy":
        if dt.kind not in "iu":
            raise TypeError(f"{name}: cross_entropy expects integer class ids, got dtype {dt}")
        if shape != want:
            raise ValueError(f"{name}: expected class ids of shape {lay}) = {want}, got {shape}")
        return DeviceSeq(y, tm(shape), np.int64, swap)
    if dt.kind not in "fiu":
        raise TypeError(f"{name}: mse expects float targets, got dtype {dt}")
    fshape = want + (O,)
    if shape != fshape:
        raise ValueError(f"{name}: expected float targets of shape {lay}, {O}) = {fshape}, got {shape}")
    return DeviceSeq(y, tm(shape), dtype, swap)
