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


def _gru_model(dtype=np.float64):
    core = fr.GRU(3, 4, num_layers=2, bidirectional=True, dtype=dtype, init="xavier",
                  seed=2)
    return fr.SequenceModel(core, 4, loss="cross_entropy", readout="all")


def _data(rng, T=7, B=3):
    return rng.standard_normal((T, B, 3)), rng.integers(0, 4, (T, B))


def _params_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]) for k in sa)


def test_public_names():
    assert fr.save is checkpoint.save and fr.load is checkpoint.load
    assert "save" in fr.__all__ and "load" in fr.__all__


@pytest.mark.parametrize("make", [_lstm_model, _rnn_model, _gru_model])
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
@pytest.mark.parametrize("make", [_lstm_model, _gru_model])
def test_train_step_round_trip_continues_bitwise(tmp_path, opt, clip, state_clip, make):
    rng = np.random.default_rng(0)
    model = make()
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


# -- hardening: crafted, foreign and damaged files; temp files; permissions ------

def _rewrite(path, edit_meta=None, drop=(), add=None):
    """Rewrite the checkpoint at `path` with its meta document edited by
    edit_meta(meta) (in place), entries in `drop` left out and `add` added."""
    import json
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    meta = json.loads(bytes(arrays["meta"]).decode())
    if edit_meta is not None:
        edit_meta(meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays.update(add or {})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_generator_names_come_from_a_fixed_table(tmp_path, monkeypatch):
    path = tmp_path / "g.npz"
    fr.save(path, _rnn_model(), extra={"rng": np.random.default_rng(0)})

    def rename(name):
        def edit(meta):
            meta["extra"]["rng"]["__generator__"]["bit_generator"] = name
        return edit
    called = []
    monkeypatch.setattr(np.random, "seed", lambda *a: called.append("seed"))
    for name in ("seed", "test", "default_rng", "Generator", "__class__", 3, None):
        _rewrite(path, rename(name))
        with pytest.raises(ValueError, match=r"g\.npz.*extra\['rng'\].*bit generator"):
            fr.load(path)
    assert not called               # never looked up in np.random by its name


@pytest.mark.parametrize("bitgen", ["PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937"])
def test_every_numpy_bit_generator_round_trips(tmp_path, bitgen):
    rng = np.random.Generator(getattr(np.random, bitgen)(7))
    rng.random(3)
    fr.save(tmp_path / "g.npz", _rnn_model(), extra={"rng": rng})
    got = fr.load(tmp_path / "g.npz").extra["rng"]
    assert type(got.bit_generator).__name__ == bitgen
    np.testing.assert_array_equal(got.random(5), rng.random(5))


def test_a_bad_generator_state_is_a_value_error(tmp_path):
    path = tmp_path / "g.npz"
    fr.save(path, _rnn_model(), extra={"rng": np.random.default_rng(0)})

    def edit(meta):
        meta["extra"]["rng"]["__generator__"]["state"] = "nonsense"
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=r"g\.npz.*extra\['rng'\]"):
        fr.load(path)


def test_metadata_is_checked_against_the_stored_shapes_before_building(tmp_path,
                                                                       monkeypatch):
    path = tmp_path / "big.npz"

    def never(*a, **k):
        raise AssertionError("a model was built from a checkpoint that does not hold it")
    for key, value in [("hidden_size", 8000), ("input_size", 10 ** 6), ("num_layers", 10 ** 9),
                       ("bidirectional", False), ("output_size", 10 ** 7), ("bias", False),
                       ("cell", "rnn"), ("dtype", "float32")]:
        fr.save(path, _lstm_model())

        def edit(meta, key=key, value=value):
            meta["model"][key] = value
            meta["model"].setdefault("nonlinearity", "tanh")
        _rewrite(path, edit)
        monkeypatch.setattr(checkpoint, "_build_model", never)
        with pytest.raises(ValueError, match=rf"big\.npz.*{key}"):
            fr.load(path)
        monkeypatch.undo()


@pytest.mark.parametrize("key,value", [("hidden_size", "8"), ("hidden_size", -1),
                                       ("num_layers", 0), ("cell", "gru"), ("dtype", "object"),
                                       ("hidden_size", True), ("bias", 1)])
def test_malformed_model_fields_are_value_errors(tmp_path, key, value):
    path = tmp_path / "m.npz"
    fr.save(path, _lstm_model())

    def edit(meta):
        meta["model"][key] = value
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=rf"m\.npz.*{key}"):
        fr.load(path)


def test_missing_fields_and_arrays_are_value_errors(tmp_path):
    path = tmp_path / "m.npz"
    model = _lstm_model()
    step = fr.TrainStep(model, fr.Adam(1e-3))
    cases = [(lambda m: m["model"].pop("hidden_size"), (), "hidden_size"),
             (lambda m: m.pop("model"), (), "model"),
             (lambda m: m["train_step"]["hyper"].pop("beta2"), (), "beta2"),
             (lambda m: m["train_step"].update(optimizer="lbfgs"), (), "optimizer"),
             (lambda m: m["train_step"].update(steps=-3), (), "steps"),
             (lambda m: m.update(step="ten"), (), "step"),
             (None, ("opt_state",), "opt_state"),
             (None, ("param/weight_hh_l1_reverse",), "weight_hh_l1_reverse")]
    for edit, drop, name in cases:
        fr.save(path, model, 3, train_step=step)
        _rewrite(path, edit, drop)
        with pytest.raises(ValueError, match=rf"m\.npz.*{name}"):
            fr.load(path)


def test_opt_state_shape_is_checked_before_building(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    model = _rnn_model()
    fr.save(path, model, train_step=fr.TrainStep(model, fr.SGD(0.1)))
    _rewrite(path, add={"opt_state": np.zeros((2, 5), np.float32)})
    monkeypatch.setattr(checkpoint, "_build_model", lambda *a: pytest.fail("built"))
    with pytest.raises(ValueError, match=r"m\.npz.*opt_state"):
        fr.load(path)


def test_extra_array_references_are_checked(tmp_path):
    path = tmp_path / "m.npz"
    fr.save(path, _rnn_model(), extra={"a": np.arange(3)})

    for ref in ("extra/7", "param/weight_ih_l0", 5):
        def edit(meta, ref=ref):
            meta["extra"]["a"] = {"__array__": ref}
        fr.save(path, _rnn_model(), extra={"a": np.arange(3)})
        _rewrite(path, edit)
        with pytest.raises(ValueError, match=r"m\.npz.*extra\['a'\]"):
            fr.load(path)


def test_not_a_checkpoint_is_a_value_error_naming_the_file(tmp_path):
    good = tmp_path / "good.npz"
    fr.save(good, _lstm_model(), 2)
    data = good.read_bytes()
    (tmp_path / "text.npz").write_text("hello, I am a text file\n" * 20)
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    (tmp_path / "cut_end.npz").write_bytes(data[:-30])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    np.savez(tmp_path / "foreign.npz", meta=np.zeros(3))
    np.savez(tmp_path / "foreign2.npz", meta=np.frombuffer(b"{not json", np.uint8))
    np.savez(tmp_path / "objects.npz", meta=np.array([{"a": 1}], dtype=object))
    for name in ("text.npz", "cut.npz", "cut_end.npz", "empty.npz", "arr.npy",
                 "foreign.npz", "foreign2.npz", "objects.npz"):
        with pytest.raises(ValueError, match=rf"{name}.*not a fastrnn checkpoint") as e:
            fr.load(tmp_path / name)
        assert "pickled" not in str(e.value)


def test_flipped_bytes_are_refused_or_harmless(tmp_path):
    good = tmp_path / "good.npz"
    model = _rnn_model()
    fr.save(good, model, 2, extra={"rng": np.random.default_rng(1)})
    data = good.read_bytes()
    bad = tmp_path / "bad.npz"
    for pos in range(0, len(data), max(1, len(data) // 97)):
        bad.write_bytes(data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1:])
        try:
            ck = fr.load(bad)
        except ValueError as e:
            assert "bad.npz" in str(e)
        else:
            assert _params_equal(ck.model, model) and ck.step == 2


def test_load_accepts_a_run_directory(tmp_path):
    model = _rnn_model()
    fr.save(tmp_path / "checkpoint.npz", model, 4)
    ck = fr.load(tmp_path)
    assert ck.step == 4 and _params_equal(ck.model, model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint.npz"):
        fr.load(empty)


def test_stale_temporary_files_of_the_target_are_removed(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = [".ck.npz.ab12_x9z.tmp",                 # an older version's mkstemp name
             f".ck.npz.{dead}-0123abcd.tmp"]         # a killed process's
    keep = [f".ck.npz.{os.getppid()}-0123abcd.tmp",  # a live process's save in flight
            ".other.npz.ab12_x9z.tmp", ".ck.npz.b.ab12_x9z.tmp", "ck.npz.tmp",
            ".ck.npz.ab12_x9z.tmp.bak", ".ck.npzz.ab12_x9z.tmp", "notes.txt"]
    for n in stale + keep:
        (tmp_path / n).write_bytes(b"x" * 10)
    fr.save(tmp_path / "ck.npz", _rnn_model())
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["ck.npz"])
    assert fr.load(tmp_path / "ck.npz").step is None


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        fr.save(tmp_path / "ck.npz", _rnn_model())
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / "ck.npz").st_mode & 0o777
    assert mode == 0o666 & ~umask == os.stat(tmp_path / "plain").st_mode & 0o777


def test_overwrite_keeps_the_file_mode(tmp_path):
    path = tmp_path / "ck.npz"
    fr.save(path, _rnn_model())
    os.chmod(path, 0o640)
    fr.save(path, _rnn_model(), 1)
    assert os.stat(path).st_mode & 0o777 == 0o640
