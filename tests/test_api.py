"""API semantics of the reference docs/api.md that are not numerical parity:
parameters and state_dict, init schemes, seeds, cells, layouts, non-finite
guard, backends."""
import numpy as np
import pytest

import fastrnn as fr
from conftest import assert_close


def test_public_names():
    for name in ["RNN", "LSTM", "RNNCell", "LSTMCell", "SequenceModel", "TrainStep",
                 "StepResult", "gradient_flow", "SGD", "Adam", "Adagrad", "ClipNorm",
                 "ClipValue", "available_backends"]:
        assert hasattr(fr, name), name


def test_state_dict_names_and_shapes():
    rnn = fr.RNN(3, 4, num_layers=2, bidirectional=True)
    sd = rnn.state_dict()
    expect = {}
    for k in range(2):
        for sfx in ("", "_reverse"):
            I = 3 if k == 0 else 8
            expect[f"weight_ih_l{k}{sfx}"] = (4, I)
            expect[f"weight_hh_l{k}{sfx}"] = (4, 4)
            expect[f"bias_ih_l{k}{sfx}"] = (4,)
            expect[f"bias_hh_l{k}{sfx}"] = (4,)
    assert {k: v.shape for k, v in sd.items()} == expect
    lstm = fr.LSTM(3, 5, bias=False)
    assert {k: v.shape for k, v in lstm.state_dict().items()} == {
        "weight_ih_l0": (20, 3), "weight_hh_l0": (20, 5)}
    cell = fr.LSTMCell(3, 2)
    assert {k: v.shape for k, v in cell.state_dict().items()} == {
        "weight_ih": (8, 3), "weight_hh": (8, 2), "bias_ih": (8,), "bias_hh": (8,)}


def test_state_dict_is_a_copy_and_loads_back():
    rnn = fr.RNN(2, 3, dtype=np.float64, seed=0)
    sd = rnn.state_dict()
    sd["weight_hh_l0"][:] = 7.0
    assert not np.any(rnn.state_dict()["weight_hh_l0"] == 7.0)
    rnn.load_state_dict(sd)
    assert np.all(rnn.state_dict()["weight_hh_l0"] == 7.0)


class _ArrayLike:
    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.a, dtype=dtype)


def test_load_state_dict_array_like_and_errors_leave_layer_unchanged():
    rnn = fr.RNN(2, 3, dtype=np.float64, seed=0)
    before = rnn.state_dict()
    new = {k: _ArrayLike(np.ones_like(v)) for k, v in before.items()}
    bad = dict(new)
    bad["weight_hh_l0"] = _ArrayLike(np.ones((3, 4)))
    with pytest.raises(ValueError, match="weight_hh_l0"):
        rnn.load_state_dict(bad)
    missing = dict(new)
    del missing["bias_ih_l0"]
    with pytest.raises(ValueError, match="bias_ih_l0"):
        rnn.load_state_dict(missing)
    for k, v in rnn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    rnn.load_state_dict(new)
    for v in rnn.state_dict().values():
        assert np.all(v == 1)


def test_model_state_dict_and_shared_core():
    core = fr.RNN(3, 4, bidirectional=True, dtype=np.float64, seed=1)
    core_before = core.state_dict()
    model = fr.SequenceModel(core, 5)
    sd = model.state_dict()
    assert sd["weight_out"].shape == (5, 8) and sd["bias_out"].shape == (5,)
    for k, v in core_before.items():
        np.testing.assert_array_equal(sd[k], v)
    step = fr.TrainStep(model, fr.SGD(0.5))
    rng = np.random.default_rng(0)
    step(rng.standard_normal((4, 2, 3)), rng.integers(0, 5, (4, 2)))
    after = model.state_dict()
    for k, v in core.state_dict().items():   # the core sees the update
        np.testing.assert_array_equal(v, after[k])
        assert not np.array_equal(v, core_before[k])
    with pytest.raises(ValueError, match="weight_out"):
        bad = dict(after)
        del bad["weight_out"]
        model.load_state_dict(bad)


@pytest.mark.parametrize("cls", [fr.RNN, fr.LSTM])
def test_seed_gives_same_parameters_on_every_backend(cls):
    names = [n for n, (ok, _) in fr.available_backends().items() if ok]
    sds = [cls(3, 4, 2, dtype=np.float64, seed=42, backend=b).state_dict() for b in names]
    for sd in sds[1:]:
        for k in sd:
            np.testing.assert_array_equal(sd[k], sds[0][k])
    other = cls(3, 4, 2, dtype=np.float64, seed=43).state_dict()
    assert not np.array_equal(other["weight_hh_l0"], sds[0]["weight_hh_l0"])
    f32 = cls(3, 4, 2, seed=42).state_dict()
    np.testing.assert_array_equal(f32["weight_hh_l0"], sds[0]["weight_hh_l0"].astype(np.float32))


def test_init_default_bounds():
    H = 16
    sd = fr.LSTM(5, H, seed=0, dtype=np.float64).state_dict()
    for v in sd.values():
        assert np.abs(v).max() <= 1 / np.sqrt(H)
        assert np.abs(v).max() > 0.5 / np.sqrt(H)


def test_init_orthogonal():
    H = 6
    sd = fr.LSTM(3, H, 2, seed=0, init="orthogonal", dtype=np.float64).state_dict()
    for k in ("weight_hh_l0", "weight_hh_l1"):
        for g in range(4):
            W = sd[k][g * H:(g + 1) * H]
            np.testing.assert_allclose(W @ W.T, np.eye(H), atol=1e-12)
    bound = np.sqrt(6 / (3 + 4 * H))
    assert np.abs(sd["weight_ih_l0"]).max() <= bound
    for k in ("bias_ih_l0", "bias_ih_l1"):
        np.testing.assert_array_equal(sd[k][H:2 * H], 1.0)
        np.testing.assert_array_equal(np.delete(sd[k], np.s_[H:2 * H]), 0.0)
    for k in ("bias_hh_l0", "bias_hh_l1"):
        np.testing.assert_array_equal(sd[k], 0.0)
    rs = fr.RNN(3, H, seed=0, init="orthogonal", dtype=np.float64).state_dict()
    np.testing.assert_allclose(rs["weight_hh_l0"] @ rs["weight_hh_l0"].T, np.eye(H), atol=1e-12)
    np.testing.assert_array_equal(rs["bias_ih_l0"], 0.0)


def test_init_identity_and_xavier():
    sd = fr.RNN(50, 40, nonlinearity="relu", init="identity", seed=0,
                dtype=np.float64).state_dict()
    np.testing.assert_array_equal(sd["weight_hh_l0"], np.eye(40))
    assert 0.0008 < sd["weight_ih_l0"].std() < 0.0012
    np.testing.assert_array_equal(sd["bias_ih_l0"], 0)
    with pytest.raises(ValueError, match="identity"):
        fr.LSTM(3, 4, init="identity")
    with pytest.raises(ValueError, match="identity"):
        fr.LSTMCell(3, 4, init="identity")
    sx = fr.RNN(3, 5, init="xavier", seed=0, dtype=np.float64).state_dict()
    assert np.abs(sx["weight_hh_l0"]).max() <= np.sqrt(6 / 10)
    np.testing.assert_array_equal(sx["bias_hh_l0"], 0)


def test_available_backends_and_errors():
    ab = fr.available_backends()
    assert set(ab) == {"numpy", "numba", "c", "cuda"}
    for ok, why in ab.values():
        assert isinstance(ok, bool) and isinstance(why, str) and why
    assert ab["numpy"][0]
    auto = fr.RNN(2, 2).backend
    assert auto == next(n for n in ("numba", "c", "numpy") if ab[n][0])
    for name, (ok, why) in ab.items():
        if not ok:
            with pytest.raises(RuntimeError, match=name):
                fr.RNN(2, 2, backend=name)
    with pytest.raises(ValueError, match="backend"):
        fr.RNN(2, 2, backend="tpu")


@pytest.mark.parametrize("cls", [fr.RNN, fr.LSTM])
def test_batch_first_layout(backend, cls):
    rng = np.random.default_rng(0)
    a = cls(3, 4, 2, bidirectional=True, dtype=np.float64, seed=0, backend=backend)
    b = cls(3, 4, 2, bidirectional=True, batch_first=True, dtype=np.float64, seed=0,
            backend=backend)
    x = rng.standard_normal((5, 2, 3))
    oa, ha = a(x)
    ob, hb = b(x.transpose(1, 0, 2))
    assert ob.shape == (2, 5, 8)
    assert_close(ob, oa.transpose(1, 0, 2), np.float64)
    g = rng.standard_normal(oa.shape)
    dxa, _ = a.backward(g)
    dxb, _ = b.backward(g.transpose(1, 0, 2))
    assert_close(dxb, dxa.transpose(1, 0, 2), np.float64)


@pytest.mark.parametrize("mode", ["tanh", "relu", "sigmoid", "lstm"])
def test_cells_match_one_step_of_the_layer(backend, mode):
    rng = np.random.default_rng(0)
    I, H, B = 3, 4, 2
    if mode == "lstm":
        cell = fr.LSTMCell(I, H, dtype=np.float64, seed=0, backend=backend)
        layer = fr.LSTM(I, H, dtype=np.float64, backend=backend)
    else:
        cell = fr.RNNCell(I, H, nonlinearity=mode, dtype=np.float64, seed=0, backend=backend)
        layer = fr.RNN(I, H, nonlinearity=mode, dtype=np.float64, backend=backend)
    layer.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
    x = rng.standard_normal((B, I))
    h = rng.standard_normal((B, H))
    hx = (h, rng.standard_normal((B, H))) if mode == "lstm" else h
    hx_layer = tuple(s[None] for s in hx) if mode == "lstm" else h[None]
    out_cell = cell(x, hx)
    _, st = layer(x[None], hx_layer)
    gh = rng.standard_normal((B, H))
    gout = (gh, rng.standard_normal((B, H))) if mode == "lstm" else gh
    dx_c, dh_c = cell.backward(gout)
    gl = (gout[0][None], gout[1][None]) if mode == "lstm" else gout[None]
    dx_l, dh_l = layer.backward(np.zeros((1, B, H)), gl)
    if mode == "lstm":
        for a, b in zip(out_cell, st):
            assert_close(a, b[0], np.float64)
        for a, b in zip(dh_c, dh_l):
            assert_close(a, b[0], np.float64)
    else:
        assert_close(out_cell, st[0], np.float64)
        assert_close(dh_c, dh_l[0], np.float64)
    assert_close(dx_c, dx_l[0], np.float64)
    for k, v in cell.grads.items():
        assert_close(v, layer.grads[k + "_l0"], np.float64)
    # unbatched input and token ids
    single = cell(x[0], tuple(s[0] for s in hx) if mode == "lstm" else h[0])
    first = single[0] if mode == "lstm" else single
    assert first.shape == (H,)
    ids = cell(np.array([0, 2]))
    assert (ids[0] if mode == "lstm" else ids).shape == (B, H)


def _nan_model(backend, dtype=np.float64):
    model = fr.SequenceModel(fr.RNN(2, 3, dtype=dtype, seed=0, backend=backend), 2)
    return model


@pytest.mark.parametrize("opt", [lambda: fr.SGD(0.1, momentum=0.9), lambda: fr.Adam(0.1)])
def test_nonfinite_step_is_skipped_and_changes_nothing(backend, opt):
    model = _nan_model(backend)
    step = fr.TrainStep(model, opt())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2, 2))
    y = rng.integers(0, 2, (4, 2))
    step(x, y)                      # one good step: moments are non-zero
    params = model.state_dict()
    moments = step.opt_state.copy()
    steps = step.steps
    xbad = x.copy()
    xbad[1, 0, 0] = np.nan
    r = step(xbad, y)
    assert r.skipped and not np.isfinite(r.loss)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, params[k])
    np.testing.assert_array_equal(step.opt_state, moments)
    assert step.steps == steps
    raising = fr.TrainStep(model, opt(), on_nonfinite="raise")
    with pytest.raises(FloatingPointError):
        raising(xbad, y)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, params[k])
    r = step(x, y)                   # and training goes on
    assert not r.skipped and np.isfinite(r.loss)


# the reference backend's NumPy says so when the loss overflows, as intended here
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_infinite_gradient_is_skipped(backend):
    model = _nan_model(backend)
    sd = model.state_dict()
    sd["weight_out"][0, 0] = 1e308   # finite parameters, overflowing gradient/loss
    model.load_state_dict(sd)
    step = fr.TrainStep(model, fr.SGD(0.1))
    r = step(np.ones((3, 1, 2)), np.zeros((3, 1), dtype=int))
    assert r.skipped
    np.testing.assert_array_equal(model.state_dict()["weight_hh_l0"], sd["weight_hh_l0"])


def test_step_result_fields_and_truncated_bptt(backend):
    model = fr.SequenceModel(fr.LSTM(2, 3, 2, dtype=np.float64, seed=0, backend=backend), 2)
    step = fr.TrainStep(model, fr.Adam(0.01), clip=fr.ClipNorm(1e-3))
    rng = np.random.default_rng(0)
    r = step(rng.standard_normal((4, 2, 2)), rng.integers(0, 2, (4, 2)))
    assert isinstance(r, fr.StepResult)
    assert isinstance(r.loss, float) and isinstance(r.grad_norm, float)
    assert r.clipped is True and r.skipped is False
    h, c = r.hx
    assert h.shape == c.shape == (2, 2, 3)
    r2 = step(rng.standard_normal((4, 2, 2)), rng.integers(0, 2, (4, 2)), hx=r.hx)
    assert np.isfinite(r2.loss)


def test_model_forward_shapes(backend):
    rng = np.random.default_rng(0)
    core = fr.RNN(3, 4, bidirectional=True, batch_first=True, dtype=np.float64,
                  seed=0, backend=backend)
    m = fr.SequenceModel(core, 5)
    z, h = m(rng.standard_normal((2, 6, 3)), lengths=[6, 3])
    assert z.shape == (2, 6, 5) and h.shape == (2, 2, 4)
    assert np.all(z[1, 3:] == 0)       # padding steps produce zero output
    m2 = fr.SequenceModel(fr.RNN(3, 4, dtype=np.float64, seed=0, backend=backend), 5,
                          readout="last", loss="mse")
    z2, _ = m2(rng.standard_normal((6, 2, 3)))
    assert z2.shape == (2, 5)


def test_gradient_flow_shows_vanishing_gradients(backend):
    """With small recurrent weights the gradient reaching early steps decays
    geometrically (Bengio 1994): the picture gradient_flow exists to draw."""
    T = 12
    core = fr.RNN(2, 8, dtype=np.float64, seed=0, backend=backend)
    sd = core.state_dict()
    sd["weight_hh_l0"] *= 0.3
    core.load_state_dict(sd)
    model = fr.SequenceModel(core, 2, readout="last")
    rng = np.random.default_rng(0)
    flow = fr.gradient_flow(model, rng.standard_normal((T, 4, 2)), rng.integers(0, 2, 4))
    assert flow.shape == (T,) and np.all(flow > 0)
    assert flow[0] < 1e-3 * flow[-1]
    assert np.all(np.diff(flow) > 0)


def test_backward_before_forward_raises():
    with pytest.raises(RuntimeError, match="forward"):
        fr.RNN(2, 2).backward(np.zeros((1, 1, 2)))
