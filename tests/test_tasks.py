"""The command line's tasks: shapes, seeding, what they ask, their metrics,
baselines and solved criteria."""
import numpy as np
import pytest

import fastrnn as fr
from fastrnn import tasks


def _rng(seed=0):
    return np.random.default_rng(seed)


def _onehot_logits(classes, n, scale=20.0):
    return scale * np.eye(n)[classes]


# -- registry ------------------------------------------------------------------

def test_make_task_names_aliases_and_errors(tmp_path):
    assert tasks.make_task("adding").T == 100
    assert isinstance(tasks.make_task("order", 30), tasks.TemporalOrder)
    assert isinstance(tasks.make_task("memorisation", 5), tasks.Memorization)
    with pytest.raises(ValueError, match="task: expected one of"):
        tasks.make_task("parity")
    with pytest.raises(ValueError, match="--text"):
        tasks.make_task("char")
    with pytest.raises(ValueError, match="T"):
        tasks.make_task("adding", 1)
    p = tmp_path / "t.txt"
    p.write_text("hello world " * 50)
    assert tasks.make_task("char", 8, text=str(p)).T == 8


# -- adding ---------------------------------------------------------------------

def test_adding_shapes_and_content():
    task = tasks.Adding(20)
    x, y = task.batch(_rng(), 7)
    assert x.shape == (20, 7, 2) and y.shape == (7, 1)
    assert (task.input_size, task.output_size, task.loss, task.readout) == \
        (2, 1, "mse", "last")
    assert np.all((x[:, :, 0] >= 0) & (x[:, :, 0] < 1))
    marks = x[:, :, 1]
    assert np.all(marks.sum(0) == 2)
    assert np.all(marks[:10].sum(0) == 1) and np.all(marks[10:].sum(0) == 1)
    np.testing.assert_allclose(y[:, 0], (x[:, :, 0] * marks).sum(0))


def test_adding_seeding():
    task = tasks.Adding(15)
    a, b = task.batch(_rng(3), 5), task.batch(_rng(3), 5)
    c = task.batch(_rng(4), 5)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    # the held-out set is fixed by the seed and differs from the training stream
    t1, t2 = task.test_set(0, 50), task.test_set(0, 50)
    assert np.array_equal(t1[0], t2[0])
    assert not np.array_equal(t1[0][:, :5], task.batch(_rng(0), 5)[0])


def test_adding_baseline_is_one_sixth_and_criteria():
    task = tasks.Adding(100)
    _, y = task.batch(_rng(1), 40000)
    # always predicting 1: the sum of two U(0,1) has variance 1/6 around mean 1
    assert task.metric(np.ones_like(y), y) == pytest.approx(1 / 6, abs=0.005)
    assert task.baseline == pytest.approx(1 / 6)
    assert task.metric(y, y) == 0.0
    assert task.solved(0.0099) and not task.solved(0.01) and not task.solved(1 / 6)


# -- temporal order ------------------------------------------------------------

def test_temporal_order_shapes_positions_and_classes():
    T = 100
    task = tasks.TemporalOrder(T)
    x, y = task.batch(_rng(), 500)
    assert x.shape == (T, 500) and x.dtype.kind == "i" and y.shape == (500,)
    assert (task.input_size, task.output_size, task.readout) == (6, 4, "last")
    assert x.min() >= 0 and x.max() < 6 and y.min() >= 0 and y.max() < 4
    relevant = x < 2                          # A or B
    assert np.all(relevant.sum(0) == 2)
    t = np.argwhere(relevant.T)[:, 1].reshape(500, 2)
    assert np.all((t[:, 0] >= 10) & (t[:, 0] < 20))
    assert np.all((t[:, 1] >= 50) & (t[:, 1] < 60))
    b = np.arange(500)
    np.testing.assert_array_equal(y, 2 * x[t[:, 0], b] + x[t[:, 1], b])
    assert set(np.unique(y)) == {0, 1, 2, 3}


def test_temporal_order_small_T_and_seeding():
    for T in (2, 3, 7):
        x, y = tasks.TemporalOrder(T).batch(_rng(), 50)
        assert np.all((x < 2).sum(0) == 2)
    task = tasks.TemporalOrder(30)
    a, b = task.batch(_rng(9), 4), task.batch(_rng(9), 4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_temporal_order_metric_and_criteria():
    task = tasks.TemporalOrder(20)
    _, y = task.batch(_rng(2), 20000)
    assert task.metric(_onehot_logits(y, 4), y) == 0.0
    guess = task.metric(_onehot_logits(np.zeros_like(y), 4), y)
    assert guess == pytest.approx(task.baseline, abs=0.01)
    assert task.test_size == 10000        # solved: < 1% error on 10,000 sequences
    assert task.solved(0.009) and not task.solved(0.01)


# -- memorisation ----------------------------------------------------------------

def test_memorization_layout():
    task = tasks.Memorization(T=6, pattern=3, symbols=4)
    x, y = task.batch(_rng(), 5)
    L = 6 + 2 * 3
    assert x.shape == y.shape == (L, 5) and task.length == L
    assert (task.input_size, task.output_size, task.readout) == (6, 5, "all")
    np.testing.assert_array_equal(y[9:], x[:3])          # recall the pattern
    assert np.all(x[:3] < 4)
    assert np.all(x[3:8] == 4) and np.all(x[8] == 5) and np.all(x[9:] == 4)
    assert np.all(y[:9] == 4)                            # blank before recall


def test_memorization_metric_counts_recall_steps_only():
    task = tasks.Memorization(T=4, pattern=2, symbols=3)
    x, y = task.batch(_rng(), 1000)
    z = _onehot_logits(y, 4)
    assert task.metric(z, y) == 0.0
    z_bad = z.copy()
    z_bad[:6] = _onehot_logits(np.zeros_like(y[:6]), 4)  # wrong blanks: not counted
    assert task.metric(z_bad, y) == 0.0
    z_guess = _onehot_logits(np.zeros_like(y), 4)
    assert task.metric(z_guess, y) == pytest.approx(task.baseline, abs=0.03)
    assert task.solved(0.005) and not task.solved(0.02)


# -- character language model ------------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 30


def test_char_vocab_encoding_and_windows():
    task = tasks.CharLM(TEXT, T=10, valid_fraction=0.1)
    assert task.vocab == "".join(sorted(set(TEXT)))
    assert task.input_size == task.output_size == len(task.vocab)
    assert task.decode(task.encode("lazy dog")) == "lazy dog"
    with pytest.raises(ValueError, match="vocabulary"):
        task.encode("Z")
    n = task.windows_per_epoch(4)
    x0, y0, r0 = task.train_batch(None, 4, 0)
    x1, y1, r1 = task.train_batch(None, 4, 1)
    assert x0.shape == y0.shape == (10, 4) and r0 and not r1
    np.testing.assert_array_equal(y0[:-1], x0[1:])       # next character
    np.testing.assert_array_equal(x1[0], y0[-1])         # streams continue
    xn, _, rn = task.train_batch(None, 4, n)             # a new epoch: state reset
    assert rn and np.array_equal(xn, x0)
    # each stream reads a contiguous slice of the training text
    stream0 = np.concatenate([task.train_batch(None, 4, s)[0][:, 0] for s in range(n)])
    L = len(task.train_ids) // 4
    np.testing.assert_array_equal(stream0, task.train_ids[:n * 10])
    np.testing.assert_array_equal(task.train_batch(None, 4, 0)[0][:, 1],
                                  task.train_ids[L:L + 10])


def test_char_test_set_metric_and_baseline():
    task = tasks.CharLM(TEXT, T=8)
    x, y = task.test_set(None, 4)
    assert x.shape == y.shape and x.shape[1] == 4
    np.testing.assert_array_equal(y[:-1], x[1:])
    V = len(task.vocab)
    assert task.metric(np.zeros(x.shape + (V,)), y) == pytest.approx(np.log2(V))
    assert 0 < task.baseline < np.log2(V)
    assert task.solved(1.0) is None


def test_char_too_short_or_bad_batch():
    with pytest.raises(ValueError, match="at least"):
        tasks.CharLM("abc", T=8)
    task = tasks.CharLM(TEXT, T=50)
    with pytest.raises(ValueError, match="batch"):
        task.train_batch(None, 100, 0)


# -- the tasks are solvable with the package ------------------------------------------

def test_adding_short_is_solved_quickly_by_an_lstm():
    task = tasks.Adding(10)
    model = fr.SequenceModel(fr.LSTM(2, 16, seed=0, dtype=np.float64), 1,
                             loss="mse", readout="last")
    step = fr.TrainStep(model, fr.Adam(1e-2), clip=fr.ClipNorm(1.0))
    rng = _rng(0)
    test = task.test_set(0, 500)
    before = task.evaluate(model, test)
    for _ in range(400):
        step(*task.batch(rng, 32))
    after = task.evaluate(model, test)
    assert not task.solved(before)
    assert task.solved(after), after


def test_evaluate_in_chunks_matches_one_pass():
    task = tasks.TemporalOrder(12)
    model = fr.SequenceModel(fr.LSTM(6, 5, seed=1, dtype=np.float64), 4, readout="last")
    test = task.test_set(0, 300)
    assert task.evaluate(model, test, chunk=64) == pytest.approx(
        task.evaluate(model, test, chunk=1000), abs=1e-12)
    mem = tasks.Memorization(T=3, pattern=2, symbols=2)
    m2 = fr.SequenceModel(fr.RNN(4, 5, seed=1, dtype=np.float64), 3)
    t2 = mem.test_set(0, 100)
    assert mem.evaluate(m2, t2, chunk=7) == pytest.approx(mem.evaluate(m2, t2), abs=1e-12)
