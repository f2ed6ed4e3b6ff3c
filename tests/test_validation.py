"""Bad input raises ValueError/TypeError naming the argument, before any
kernel runs (so no kernel ever reads or writes out of bounds)."""
import numpy as np
import pytest

import fastrnn as fr
from fastrnn.backends import numba_cpu


@pytest.fixture
def rnn(backend):
    return fr.RNN(3, 4, dtype=np.float64, backend=backend)


@pytest.fixture
def model(backend):
    return fr.SequenceModel(fr.RNN(3, 4, dtype=np.float64, backend=backend), 5)


X = np.zeros((5, 2, 3))


@pytest.mark.parametrize("x,exc,pattern", [
    (np.zeros((5, 3)), ValueError, r"x: expected shape \(T, B, 3\)"),       # float rank 2
    (np.zeros((5, 2, 4)), ValueError, r"x: .*input_size=3.*\(5, 2, 4\)"),   # wrong I
    (np.zeros((5, 2, 3, 1)), ValueError, "x: "),
    (np.zeros((5, 2, 3), dtype=bool), TypeError, "x: .*bool"),
    (np.zeros((5, 2, 3), dtype=complex), TypeError, "x: .*complex"),
    (np.array([["a"]]), TypeError, "x: "),
    (np.zeros((0, 2, 3)), ValueError, "x: .*non-empty"),
    (np.zeros((5, 2, 1), dtype=np.int64), ValueError, "x: integer token ids"),
    (np.array([[0, 3]]), ValueError, r"x: token ids must be in \[0, 3\).*got 3"),
    (np.array([[0, -1]]), ValueError, r"x: token ids.*got -1"),
])
def test_bad_x(rnn, x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        rnn(x)


def test_out_of_range_ids_never_reach_a_kernel(monkeypatch, backend):
    called = []
    monkeypatch.setattr(numba_cpu, "core_forward_kernel", lambda *a: called.append(1))
    monkeypatch.setattr(numba_cpu, "train_step_kernel", lambda *a: called.append(1))
    m = fr.SequenceModel(fr.RNN(3, 4, backend=backend), 2)
    with pytest.raises(ValueError, match="token ids"):
        m.core(np.array([[1, 99]]))
    with pytest.raises(ValueError, match="token ids"):
        fr.TrainStep(m, fr.SGD(0.1))(np.array([[1, 3]]), np.zeros((1, 2), int))
    with pytest.raises(ValueError, match="class ids"):
        fr.TrainStep(m, fr.SGD(0.1))(np.array([[1, 2]]), np.array([[0, 2]]))
    assert not called


@pytest.mark.parametrize("lengths,exc,pattern", [
    ([5], ValueError, r"lengths: expected shape \(2,\)"),
    ([5, 0], ValueError, r"lengths: expected values in \[1, 5\].*got 0"),
    ([6, 1], ValueError, r"lengths: expected values in \[1, 5\].*got 6"),
    ([2.5, 1], TypeError, "lengths: expected integers"),
    ([[5, 5]], ValueError, "lengths: expected shape"),
])
def test_bad_lengths(rnn, lengths, exc, pattern):
    with pytest.raises(exc, match=pattern):
        rnn(X, lengths=lengths)


def test_bad_hx(rnn, backend):
    with pytest.raises(ValueError, match=r"hx: expected shape \(1, 2, 4\), got \(1, 2, 3\)"):
        rnn(X, np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="hx: "):
        rnn(X, np.zeros((2, 4)))
    lstm = fr.LSTM(3, 4, backend=backend)
    with pytest.raises(TypeError, match=r"hx: expected a pair \(h0, c0\)"):
        lstm(X, np.zeros((1, 2, 4)))
    with pytest.raises(ValueError, match=r"hx\[1\] \(c0\)"):
        lstm(X, (np.zeros((1, 2, 4)), np.zeros((1, 2, 5))))


def test_bad_backward_args(rnn):
    rnn(X)
    with pytest.raises(ValueError, match=r"grad_out: expected shape \(5, 2, 4\)"):
        rnn.backward(np.zeros((5, 2, 3)))
    with pytest.raises(ValueError, match="grad_hn: expected shape"):
        rnn.backward(np.zeros((5, 2, 4)), np.zeros((2, 2, 4)))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(input_size=0), ValueError, "input_size: expected an int >= 1, got 0"),
    (dict(input_size=2.0), TypeError, "input_size: expected an int"),
    (dict(hidden_size=-1), ValueError, "hidden_size"),
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(nonlinearity="gelu"), ValueError, "nonlinearity: expected one of"),
    (dict(bias="yes"), TypeError, "bias: expected a bool"),
    (dict(bidirectional=1), TypeError, "bidirectional"),
    (dict(batch_first=None), TypeError, "batch_first"),
    (dict(dtype=np.int32), TypeError, "dtype: expected np.float32 or np.float64"),
    (dict(dtype=np.float16), TypeError, "dtype"),
    (dict(init="he"), ValueError, "init: expected one of"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(backend="gpu"), ValueError, "backend: expected one of"),
])
def test_bad_constructor_args(kwargs, exc, pattern):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        fr.RNN(**args)


def test_bad_model_and_step_args(model):
    with pytest.raises(TypeError, match="core"):
        fr.SequenceModel(np.zeros(3), 2)
    with pytest.raises(ValueError, match="output_size"):
        fr.SequenceModel(model.core, 0)
    with pytest.raises(ValueError, match="loss: expected one of"):
        fr.SequenceModel(fr.RNN(3, 4), 2, loss="hinge")
    with pytest.raises(ValueError, match="readout: expected one of"):
        fr.SequenceModel(fr.RNN(3, 4), 2, readout="first")
    with pytest.raises(TypeError, match="optimizer"):
        fr.TrainStep(model, "sgd")
    with pytest.raises(TypeError, match="clip"):
        fr.TrainStep(model, fr.SGD(0.1), clip=1.0)
    with pytest.raises(ValueError, match="state_clip"):
        fr.TrainStep(model, fr.SGD(0.1), state_clip=-1.0)
    with pytest.raises(ValueError, match="on_nonfinite: expected one of"):
        fr.TrainStep(model, fr.SGD(0.1), on_nonfinite="ignore")
    with pytest.raises(ValueError, match="lr"):
        fr.SGD(-0.1)
    with pytest.raises(ValueError, match="momentum"):
        fr.SGD(0.1, momentum=-0.5)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        fr.Adam(betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="betas"):
        fr.Adam(betas=0.9)
    with pytest.raises(ValueError, match="eps"):
        fr.Adagrad(eps=-1.0)
    with pytest.raises(ValueError, match="max_norm"):
        fr.ClipNorm(-1.0)
    with pytest.raises(ValueError, match="limit"):
        fr.ClipValue(float("nan"))


def test_bad_targets(model, backend):
    step = fr.TrainStep(model, fr.SGD(0.1))
    with pytest.raises(ValueError, match=r"y: expected class ids of shape \(T, B\)"):
        step(X, np.zeros((5, 3), dtype=int))
    with pytest.raises(TypeError, match="y: cross_entropy expects integer class ids"):
        step(X, np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"y: class ids must be in \[0, 5\).*got 5"):
        step(X, np.full((5, 2), 5))
    # targets at padding steps are ignored, even out of range
    y = np.zeros((5, 2), dtype=int)
    y[3:, 1] = -100
    assert np.isfinite(step(X, y, lengths=[5, 3]).loss)
    mse = fr.SequenceModel(fr.RNN(3, 4, backend=backend), 2, loss="mse", readout="last")
    s2 = fr.TrainStep(mse, fr.SGD(0.1))
    with pytest.raises(ValueError, match=r"y: expected float targets of shape \(B, 2\)"):
        s2(X, np.zeros((2, 3)))


def test_bad_state_dict(rnn):
    with pytest.raises(TypeError, match="state_dict"):
        rnn.load_state_dict([1, 2])
    sd = rnn.state_dict()
    sd["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match="unexpected key"):
        rnn.load_state_dict(sd)
