"""The one owner of a flat host buffer whose newest copy may live on a device.

A layer's parameters, a SequenceModel's parameters (the core's, then the
read-out's) and a TrainStep's optimizer moments are each one flat NumPy
array. A backend may keep a newer copy on a device between training steps
(cuda; the protocol is fastrnn/_mirror.py). The classes here are the only
code outside the backends that talks to _mirror, so the rule "make the host
copy current before it is read, and mark it written before it is written"
is a property of the access path, not a rule each caller must remember:

- ``HostBuffer.read()``: the array, made current (``_mirror.sync``);
- ``HostBuffer.write()``: the array, made current and marked written (any
  device copy is out of date afterwards; ``_mirror.touch``);
- ``HostBuffer.raw``: the array as it is, for a backend that keeps the
  device copy itself (``train_step``, ``train_grad``, ``apply_update``).

``ParamBuffer`` adds the parameter layout (a Spec): named views, copies,
the views handed to the user (``export``), and loading a state dict with the
validate-whole-then-copy rule. ``ParamBuffer.extend`` makes a larger buffer
(a SequenceModel's) whose head becomes the smaller one's storage, so the
core and the model always agree. ``HasParams`` gives layers and
SequenceModel the same parameter methods (state_dict, load_state_dict,
parameters, num_parameters) over their ``_pbuf`` and ``_lock``.
"""
import numpy as np

from . import _mirror
from ._spec import views
from ._validate import as_array


class HostBuffer:
    """A flat host array whose newest copy may be on a device."""

    __slots__ = ("_array",)

    def __init__(self, array):
        self._array = array

    @property
    def raw(self):
        """The array as it is, not made current: only for backends that
        sync it through _mirror themselves."""
        return self._array

    @property
    def size(self):
        return int(self._array.size)

    @property
    def dtype(self):
        return self._array.dtype

    def read(self):
        """The array, made current, for reading."""
        _mirror.sync(self._array)
        return self._array

    def write(self):
        """The array, made current and marked written (a device copy made
        before is out of date afterwards)."""
        _mirror.touch(self._array)
        return self._array


class ParamBuffer(HostBuffer):
    """A flat parameter array with its layout (``spec``)."""

    __slots__ = ("spec",)

    def __init__(self, spec, array):
        super().__init__(array)
        self.spec = spec

    def views(self):
        """Named views of the current parameters, for reading."""
        return views(self.spec, self.read())

    def copies(self):
        """{name: copy} in state_dict order."""
        return {k: v.copy() for k, v in self.views().items()}

    def export(self):
        """Named views handed to the user: while any is alive the host array
        stays current after every step (see _mirror.export)."""
        return views(self.spec, _mirror.export(self._array))

    def load(self, d, owner, strict=True):
        """Validate the whole state dict ``d`` against the layout, then copy
        it in: a missing key, an unexpected one (strict), a wrong shape or a
        non-numeric dtype raises and leaves the buffer unchanged."""
        new = check_state_dict(self.spec, d, owner, strict)
        v = views(self.spec, self.write())
        for k, a in new.items():
            v[k][...] = a

    def extend(self, spec, fill_tail):
        """A ParamBuffer for ``spec`` (this layout followed by more
        parameters) whose head holds this buffer's values; this buffer then
        lives inside it (its array becomes a view of the new one's head).
        ``fill_tail(flat)`` sets the new parameters (flat[self.size:])."""
        n = self.size
        flat = np.zeros(spec._n_total, dtype=self.dtype)
        flat[:n] = self.read()
        fill_tail(flat)
        self._array = flat[:n]
        return ParamBuffer(spec, flat)


def check_state_dict(spec, d, owner, strict=True):
    """{name: array} for every name of the layout, validated; raises
    TypeError/ValueError naming the bad key without changing anything."""
    if not hasattr(d, "keys"):
        raise TypeError(f"state_dict: expected a mapping of names to arrays, "
                        f"got {type(d).__name__}")
    expected = list(spec.layout)
    missing = [k for k in expected if k not in d]
    if missing:
        raise ValueError(f"state_dict: missing key(s) {missing} for {owner}; "
                         f"expected keys {expected}")
    unexpected = [k for k in d.keys() if k not in spec.layout]
    if strict and unexpected:
        raise ValueError(f"state_dict: unexpected key(s) {unexpected} for {owner}; "
                         f"expected keys {expected}")
    new = {}
    for k in expected:
        a = as_array(f"state_dict[{k!r}]", d[k])
        shape = spec.layout[k][1]
        if a.shape != shape:
            raise ValueError(f"state_dict[{k!r}]: expected shape {shape}, got {a.shape}")
        if a.dtype.kind not in "fiu":
            raise TypeError(f"state_dict[{k!r}]: expected a float array, got dtype {a.dtype}")
        new[k] = a
    return new


class HasParams:
    """Parameter methods shared by layers and SequenceModel. The class
    provides ``_pbuf`` (a ParamBuffer), ``_lock`` (re-entrant) and
    ``_forget_cache()`` (called after the parameters were replaced)."""

    @property
    def _buf(self):
        """The flat parameter array as it is (not made current)."""
        return self._pbuf.raw

    @property
    def _flat(self):
        """The flat parameter array, made current and marked written."""
        return self._pbuf.write()

    def _params(self):
        """The flat parameter array, made current, for reading."""
        return self._pbuf.read()

    def state_dict(self):
        """{name: copy} in the layout's order (PyTorch's names and shapes)."""
        with self._lock:
            return self._pbuf.copies()

    def load_state_dict(self, d, strict=True):
        """Load numpy arrays / array-likes / torch tensors; validated whole
        first: a missing key or a wrong shape raises ValueError and leaves
        the parameters unchanged."""
        with self._lock:
            self._pbuf.load(d, self._owner_name, strict)
            self._forget_cache()

    def parameters(self):
        """Named views (not copies) of the parameters, in state_dict order."""
        return self._pbuf.export()

    def num_parameters(self):
        return self._pbuf.size

    @property
    def _owner_name(self):
        return type(self).__name__
