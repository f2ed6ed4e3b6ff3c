"""fr.save / fr.load: what a checkpoint holds, that it rebuilds the model and
the training step exactly, and that its write is atomic."""
import os

import numpy as np
import pytest

import fastrnn as fr
from fastrnn import checkpoint


def _lstm_model(dtype=np.float64, **kw):
    core = fr.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=dtype, init="orthogonal",
                   seed=4, **kw)
    return fr.SequenceModel(core, 4, loss="cross_entropy", readout="all")


def _rnn_model(dtype=np.float32):
    core = fr.RNN(2, 6, nonlinearity="relu", dtype=dtype, init="identity", seed=1)
    return fr.SequenceModel(core, 1, loss="mse", readout="last")


def _data(rng, T=7, B=3):
    return rng.standard_normal((T, B, 3)), rng.integers(0, 4, (T, B))


def _params_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]) for k in sa)


def test_public_names():
    assert fr.save is checkpoint.save and fr.load is checkpoint.load
    assert "save" in fr.__all__ and "load" in fr.__all__


@pytest.mark.parametrize("make", [_lstm_model, _rnn_model])
def test_model_round_trip(tmp_path, make):
    model = make()
    for v in model.parameters().values():        # not the init: trained-looking values
        v += 0.01 * np.arange(v.size, dtype=v.dtype).reshape(v.shape)
    path = tmp_path / "m.npz"
    fr.save(path, model, 17)
    ck = fr.load(path)
    m2 = ck.model
    assert ck.step == 17 and ck.train_step is None and ck.extra == {}
    assert _params_equal(model, m2)
    c1, c2 = model.core, m2.core
    assert type(c1) is type(c2)
    for a in ("input_size", "hidden_size", "num_layers", "bias", "batch_first",
              "bidirectional", "init", "seed", "backend"):
        assert getattr(c1, a) == getattr(c2, a), a
    assert c1.dtype == c2.dtype
    assert (m2.output_size, m2.loss, m2.readout) == (model.output_size, model.loss,
                                                       model.readout)
    if isinstance(c1, fr.RNN):
        assert c2.nonlinearity == c1.nonlinearity
    x = np.random.default_rng(0).standard_normal((6, 2, c1.input_size))
    np.testing.assert_array_equal(model(x)[0], m2(x)[0])


def test_load_with_another_backend(tmp_path):
    model = _rnn_model(np.float64)
    fr.save(tmp_path / "m.npz", model)
    m2 = fr.load(tmp_path / "m.npz", backend="numpy").model
    assert m2.backend == "numpy"
    assert _params_equal(model, m2)


@pytest.mark.parametrize("opt,clip,state_clip", [
    (fr.Adam(3e-3, betas=(0.8, 0.99), eps=1e-7), fr.ClipNorm(0.5), None),
    (fr.SGD(0.1, momentum=0.9), fr.ClipValue(0.01), 0.5),
    (fr.Adagrad(0.05, eps=1e-6), None, None),
])
def test_train_step_round_trip_continues_bitwise(tmp_path, opt, clip, state_clip):
    rng = np.random.default_rng(0)
    model = _lstm_model()
    step = fr.TrainStep(model, opt, clip=clip, state_clip=state_clip)
    for _ in range(3):
        step(*_data(rng))
    fr.save(tmp_path / "c.npz", model, 3, train_step=step, extra={"rng": rng})
    ck = fr.load(tmp_path / "c.npz")
    s2 = ck.train_step
    assert s2.model is ck.model and s2.steps == step.steps == 3
    assert s2.optimizer.kind == opt.kind and s2.optimizer.hyper == opt.hyper
    assert (s2.clip is None) == (clip is None)
    if clip is not None:
        assert type(s2.clip) is type(clip) and s2.clip.limit == clip.limit
    assert s2.state_clip == state_clip and s2.on_nonfinite == step.on_nonfinite
    np.testing.assert_array_equal(s2.opt_state, step.opt_state)
    rng2 = ck.extra["rng"]
    for _ in range(3):                    # both continue on identical data
        r1 = step(*_data(rng))
        r2 = s2(*_data(rng2))
        assert r1.loss == r2.loss and r1.grad_norm == r2.grad_norm
    assert _params_equal(model, ck.model)
    np.testing.assert_array_equal(s2.opt_state, step.opt_state)


def test_extra_round_trip(tmp_path):
    rng = np.random.default_rng(123)
    rng.standard_normal(5)
    h = np.arange(6.0).reshape(1, 2, 3)
    extra = {"rng": rng, "hx": (h, h + 1), "single": np.int64(3), "f": 0.5,
             "nested": {"a": [1, "two", None, np.float32(2.5)], "arr": np.eye(2)},
             "flag": True, "text": "héllo"}
    model = _rnn_model()
    fr.save(tmp_path / "e.npz", model, extra=extra)
    got = fr.load(tmp_path / "e.npz").extra
    assert isinstance(got["rng"], np.random.Generator)
    np.testing.assert_array_equal(got["rng"].random(4), rng.random(4))
    assert isinstance(got["hx"], tuple)
    np.testing.assert_array_equal(got["hx"][1], h + 1)
    assert got["single"] == 3 and got["f"] == 0.5 and got["flag"] is True
    assert got["nested"]["a"] == [1, "two", None, 2.5]
    np.testing.assert_array_equal(got["nested"]["arr"], np.eye(2))
    assert got["text"] == "héllo"


def test_save_rejects_bad_arguments(tmp_path):
    model = _rnn_model()
    with pytest.raises(TypeError, match="model"):
        fr.save(tmp_path / "x.npz", object())
    with pytest.raises(TypeError, match="extra"):
        fr.save(tmp_path / "x.npz", model, extra={"f": open})
    with pytest.raises(TypeError, match="step"):
        fr.save(tmp_path / "x.npz", model, 1.5)
    other = fr.TrainStep(_rnn_model(), fr.SGD(0.1))
    with pytest.raises(ValueError, match="train_step"):
        fr.save(tmp_path / "x.npz", model, train_step=other)
    assert not os.listdir(tmp_path)


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a fastrnn checkpoint"):
        fr.load(tmp_path / "a.npz")


def _crash_halfway(monkeypatch):
    real = checkpoint._write_arrays

    def writer(f, arrays):
        import io
        buf = io.BytesIO()
        real(buf, arrays)
        data = buf.getvalue()
        f.write(data[:len(data) // 2])
        raise RuntimeError("simulated crash mid-write")
    monkeypatch.setattr(checkpoint, "_write_arrays", writer)


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    model = _lstm_model()
    fr.save(path, model, 1)
    before = open(path, "rb").read()
    for v in model.parameters().values():
        v += 1.0
    _crash_halfway(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fr.save(path, model, 2)
    assert open(path, "rb").read() == before
    ck = fr.load(path)
    assert ck.step == 1 and not _params_equal(ck.model, model)
    assert os.listdir(tmp_path) == ["ck.npz"]          # no temporary file left behind


def test_crash_mid_write_without_previous_leaves_nothing(tmp_path, monkeypatch):
    _crash_halfway(monkeypatch)
    with pytest.raises(RuntimeError):
        fr.save(tmp_path / "ck.npz", _rnn_model())
    assert os.listdir(tmp_path) == []


def test_failed_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    model = _rnn_model()
    fr.save(path, model, 5)
    before = open(path, "rb").read()

    def boom(src, dst):
        raise OSError("simulated failure at rename")
    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError, match="rename"):
        fr.save(path, model, 6)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ck.npz"]


def test_write_is_fsynced_then_renamed(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint.os, "fsync",
                        lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(checkpoint.os, "replace",
                        lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    fr.save(tmp_path / "ck.npz", _rnn_model())
    assert calls[:2] == ["fsync", "replace"]
