"""fastrnn/_mirror.py: the protocol by which a backend keeps parameters on a
device between steps while the host arrays stay the parameters for the user.
Checked here with a stand-in holder on the host backends, so it runs
everywhere; tests/test_cuda.py checks the cuda backend itself."""
import gc

import numpy as np
import pytest

import fastrnn as fr
from fastrnn import _mirror


class _Holder:
    """Keeps a 'device copy' of a host array: newer values to copy back."""

    def __init__(self, host, newer):
        self.host, self.newer, self.pulls = host, newer, 0
        _mirror.hold(host, self)

    def pull(self):
        self.pulls += 1
        self.host[...] = self.newer
        _mirror.drop(self)


def _model(backend="numpy"):
    core = fr.RNN(3, 4, dtype=np.float64, seed=0, backend=backend)
    return fr.SequenceModel(core, 2)


@pytest.mark.parametrize("access", ["state_dict", "core.state_dict", "forward",
                                    "core.forward", "parameters", "_flat", "save"])
def test_every_host_access_pulls_a_newer_copy_first(access, tmp_path):
    model = _model()
    newer = model._buf + 1.0
    h = _Holder(model._buf, newer)
    x = np.zeros((2, 1, 3))
    if access == "state_dict":
        got = model.state_dict()["bias_out"]
    elif access == "core.state_dict":
        got = model.core.state_dict()["bias_hh_l0"]
    elif access == "forward":
        model(x)
        got = model._buf
    elif access == "core.forward":
        model.core(x)
        got = model._buf
    elif access == "parameters":
        got = model.parameters()["weight_out"]
    elif access == "_flat":
        got = model._flat
    else:
        fr.save(tmp_path / "m.npz", model)
        got = fr.load(tmp_path / "m.npz").model._buf
    assert h.pulls == 1
    np.testing.assert_array_equal(model._buf, newer)
    assert np.asarray(got).size and np.all(np.isin(np.asarray(got).ravel(), newer))
    model.state_dict()          # nothing newer any more: no second pull
    assert h.pulls == 1


def test_writes_bump_the_version_reads_do_not():
    model = _model()
    e = _mirror.entry(model._buf)
    v = e.version
    model.state_dict()
    model(np.zeros((2, 1, 3)))
    assert e.version == v
    model.load_state_dict(model.state_dict())
    assert e.version == v + 1
    model.core.load_state_dict(model.core.state_dict())   # same buffer (a view)
    assert e.version == v + 2
    step = fr.TrainStep(model, fr.Adam(0.1))
    eo = _mirror.entry(step._opt)
    w = eo.version
    step.state_dict()
    assert eo.version == w
    step.load_state_dict(step.state_dict())
    assert eo.version == w + 1


def test_views_are_tracked_until_the_last_derived_one_dies():
    model = _model()
    assert not _mirror.exported(model._buf)
    p = model.parameters()
    w = p["weight_hh_l0"].T[1:]
    assert w.flags.writeable
    del p
    gc.collect()
    assert _mirror.exported(model._buf)
    w[0, 0] = 5.0                                  # still writes the parameters
    assert model.state_dict()["weight_hh_l0"][0, 1] == 5.0
    del w
    gc.collect()
    assert not _mirror.exported(model._buf)


def test_records_go_with_their_buffers():
    model = _model()
    key = id(_mirror._root(model._buf))
    _mirror.entry(model._buf)
    assert key in _mirror._entries
    del model
    gc.collect()
    assert key not in _mirror._entries


def test_host_backends_keep_nothing_on_a_device():
    """numba/c/numpy update the host arrays in place: no record of a holder
    is ever made, and a TrainStep's result is visible at once."""
    model = _model("numba")
    step = fr.TrainStep(model, fr.SGD(0.1))
    before = model._buf.copy()
    step(np.ones((2, 1, 3)), np.zeros((2, 1), dtype=np.int64))
    assert not np.array_equal(model._buf, before)
    e = _mirror.entry(model._buf, create=False)
    assert e is None or e.holder is None
