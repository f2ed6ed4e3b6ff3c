"""Host buffers whose newest copy may live on a device.

A model's flat parameter buffer and a TrainStep's optimizer moments are host
(NumPy) arrays, and to the user they always are the parameters: state_dict,
parameters(), save, load_state_dict all work on them. A backend that keeps
them on a device between training steps (cuda) instead of copying them back
after every step registers itself here as the *holder* of a newer copy; every
host-side access goes through this module first, which copies the newer copy
back (``holder.pull()``) before the host array is read or written.

Per host buffer (its root array, the one that owns the memory) this module
keeps:
- the holder, if a device copy is newer than the host array;
- a version, bumped whenever the host array may have been written (then a
  device copy made earlier is out of date and must be uploaded again);
- weak references to the views handed out by ``parameters()``: while any of
  them (or anything derived from one) is alive, the user can read or write
  the host array at any time without telling anyone, so a device holder must
  keep the host array current after every step and upload it before every
  step (the "mirrored" mode, as if nothing were kept on the device).

Backends that compute on the host never register a holder; for them every
function here is a dictionary look-up.
"""
import weakref

import numpy as np


class _Entry:
    __slots__ = ("ref", "holder", "version", "views", "__weakref__")

    def __init__(self, root):
        key = id(root)
        self.ref = weakref.ref(root, lambda _, k=key: _entries.pop(k, None))
        self.holder = None
        self.version = 0
        self.views = []


_entries = {}


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def entry(a, create=True):
    """The record of host array ``a``'s root buffer (None if there is none
    and create is False)."""
    r = _root(a)
    e = _entries.get(id(r))
    if e is not None and e.ref() is not r:   # an id reused after the old root died
        e = None
    if e is None and create:
        e = _entries[id(r)] = _Entry(r)
    return e


def sync(a):
    """Make host array ``a`` current (copy a newer device copy back) before
    it is read."""
    e = entry(a, create=False)
    if e is not None and e.holder is not None:
        e.holder.pull()


def touch(a):
    """Make ``a`` current before it may be written: afterwards any device copy
    is out of date."""
    e = entry(a)
    if e.holder is not None:
        e.holder.pull()
    e.version += 1


def export(a):
    """A view of the whole of ``a`` (contiguous) to build user-visible views
    from. Everything derived from it keeps it alive, so ``exported(a)`` says
    whether the user still holds any of them."""
    touch(a)
    v = np.frombuffer(memoryview(a), dtype=a.dtype)
    e = entry(a)
    e.views = [r for r in e.views if r() is not None]
    e.views.append(weakref.ref(v))
    return v


def exported(a):
    """Whether any view made by export(a) (or derived from one) is alive."""
    e = entry(a, create=False)
    if e is None:
        return False
    e.views = [r for r in e.views if r() is not None]
    return bool(e.views)


def hold(a, holder):
    """Record that ``holder`` has a newer copy of host array ``a``."""
    entry(a).holder = holder


def drop(holder):
    """Forget every record of ``holder`` holding a newer copy (after its pull)."""
    for e in list(_entries.values()):
        if e.holder is holder:
            e.holder = None
