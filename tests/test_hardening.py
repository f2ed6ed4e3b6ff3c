"""Hardening (issue 13): faults found by probing the public API as a careless
or hostile user would, each kept fixed here, on every backend.

- read-only inputs (np.load(..., mmap_mode="r"), writeable=False) are
  accepted, give the same numbers, and are never written;
- a step is atomic: an update that would make any parameter or optimizer
  moment non-finite is skipped like a non-finite gradient;
- one model driven from several threads is serialised by a per-model lock
  (results equal some sequential order); two models share no lock;
- NaN/inf in x at padding steps is ignored like any other padding;
- the optimizers' and clips' argument ranges are PyTorch's.
"""
import math
import sys
import threading

import numpy as np
import pytest

import fastrnn as fr
from conftest import assert_close


def _frozen(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def _mapped(tmp_path, name, a):
    path = tmp_path / f"{name}.npy"
    np.save(path, np.asarray(a))
    m = np.load(path, mmap_mode="r")
    assert not m.flags.writeable
    return m


def _core(backend, mode, dtype=np.float64, **kw):
    if mode == "lstm":
        return fr.LSTM(3, 3, dtype=dtype, seed=0, backend=backend, **kw)
    return fr.RNN(3, 3, nonlinearity=mode, dtype=dtype, seed=0, backend=backend, **kw)


def _flat(obj):
    """Every number a layer, model or (model, TrainStep) holds, as one tuple."""
    if isinstance(obj, tuple):
        model, step = obj
        sd = step.state_dict()
        return _flat(model) + (sd["opt_state"].copy(), sd["steps"])
    return tuple(v for _, v in sorted(obj.state_dict().items()))


def _equal(a, b, close=False):
    """Bitwise equality of nested results (arrays, floats, tuples, dicts);
    with close, floats within the tolerance table instead (the cuda
    backend's float atomics add in no fixed order)."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            _equal(a[k], b[k], close)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _equal(u, v, close)
    elif a is None:
        assert b is None
    elif close and np.asarray(a).dtype.kind == "f":
        assert_close(a, b)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _same(backend):
    """The equality of two runs of one backend on equal inputs."""
    return lambda a, b: _equal(a, b, close=backend == "cuda")


# ============================================================================
# fault 1: read-only inputs
# ============================================================================
def _drive(backend, mode, tok, inp):
    """Everything the API does with sequence inputs, on fresh objects; returns
    all results."""
    out = {}
    core = _core(backend, mode)
    o, hn = core(inp["x"], inp["hx"], lengths=inp["lengths"])
    dx, dh = core.backward(inp["gout"], inp["hx"])
    out["layer"] = (o, hn, dx, dh, core.grads)
    model = fr.SequenceModel(_core(backend, mode), 2)
    out["forward"] = model(inp["x"], inp["hx"], lengths=inp["lengths"])
    out["flow"] = fr.gradient_flow(model, inp["x"], inp["y"], inp["hx"], inp["lengths"])
    step = fr.TrainStep(model, fr.Adam(0.01))
    for _ in range(2):
        r = step(inp["x"], inp["y"], inp["hx"], inp["lengths"])
        out.setdefault("steps", []).append((r.loss, r.grad_norm, r.skipped, r.hx))
    out["params"] = _flat((model, step))
    last = fr.SequenceModel(_core(backend, mode), 3, loss="mse", readout="last")
    r = fr.TrainStep(last, fr.SGD(0.1))(inp["x"], inp["ylast"], None, inp["lengths"])
    out["last"] = (r.loss, _flat(last))
    cell = (fr.LSTMCell if mode == "lstm" else fr.RNNCell)(3, 3, dtype=np.float64,
                                                           seed=0, backend=backend)
    chx = (inp["hx"][0][0], inp["hx"][1][0]) if mode == "lstm" else inp["hx"][0]
    out["cell"] = cell(inp["x"][0], chx)
    return out


@pytest.mark.parametrize("mode,tok", [("tanh", False), ("lstm", False), ("tanh", True),
                                      ("lstm", True)])
def test_read_only_inputs_are_accepted_give_the_same_numbers_and_stay_unchanged(
        backend, mode, tok, tmp_path):
    rng = np.random.default_rng(1)
    T, B, H = 4, 2, 3
    x = rng.integers(0, 3, (T, B)) if tok else rng.standard_normal((T, B, 3))
    h0 = rng.standard_normal((1, B, H))
    writable = dict(x=x, y=rng.integers(0, 2, (T, B)), lengths=np.array([4, 2]),
                    ylast=rng.standard_normal((B, 3)), gout=rng.standard_normal((T, B, H)),
                    hx=(h0, rng.standard_normal((1, B, H))) if mode == "lstm" else h0)

    def each(f):
        return {k: (tuple(f(k, a) for a in v) if isinstance(v, tuple) else f(k, v))
                for k, v in writable.items()}

    originals = each(lambda k, a: a.copy())
    expected = _drive(backend, mode, tok, writable)
    for name, inp in (("frozen", each(lambda k, a: _frozen(a))),
                      ("mmap", each(lambda k, a: _mapped(tmp_path, f"{k}{id(a)}", a)))):
        got = _drive(backend, mode, tok, inp)
        _same(backend)(got, expected)
        _equal(inp, originals)       # read-only inputs are left as they were
    _equal(writable, originals)      # writable inputs are never written either


# ============================================================================
# fault 2: a step is atomic
# ============================================================================
def _zero_grad_case(backend, dtype):
    """A model and a batch whose gradient has exact zeros (the weight_ih
    column of an input feature that is always 0) and is finite elsewhere."""
    model = fr.SequenceModel(fr.RNN(3, 4, dtype=dtype, seed=0, backend=backend), 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 3))
    x[..., 0] = 0
    return model, x, rng.integers(0, 2, (5, 2))


def _assert_unchanged(model, step, before):
    _equal(_flat((model, step)), before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make_opt", [lambda: fr.Adam(1e-2, eps=0.0),
                                      lambda: fr.Adagrad(1e-2, eps=0.0)],
                         ids=["adam", "adagrad"])
def test_update_that_would_be_nonfinite_is_skipped_whole(backend, dtype, make_opt):
    model, x, y = _zero_grad_case(backend, dtype)
    step = fr.TrainStep(model, make_opt())
    before = _flat((model, step))
    r = step(x, y)                               # 0/0 in the update of the zeros
    assert r.skipped and not r.clipped
    assert np.isfinite(r.loss) and np.isfinite(r.grad_norm)
    _assert_unchanged(model, step, before)
    raising = fr.TrainStep(model, make_opt(), on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="non-finite"):
        raising(x, y)
    _assert_unchanged(model, step, before)
    assert raising.steps == 0 and not np.any(raising.opt_state)
    x2 = np.random.default_rng(3).standard_normal(x.shape)   # no zero gradient
    r = step(x2, y)
    assert not r.skipped and step.steps == 1
    assert all(np.all(np.isfinite(v)) for v in _flat((model, step))[:-1])


@pytest.mark.parametrize("dtype,mu", [(np.float32, 1e25), (np.float64, 1e200)])
def test_moment_overflow_is_skipped_and_changes_nothing(backend, dtype, mu):
    """SGD with lr=0 (a frozen step) and a huge momentum: the third step's
    momentum buffer overflows while the parameters would stay finite."""
    model, x, y = _zero_grad_case(backend, dtype)
    x[..., 0] = 1
    step = fr.TrainStep(model, fr.SGD(0.0, momentum=mu))
    p0 = _flat(model)
    for _ in range(2):
        assert not step(x, y).skipped
    _equal(_flat(model), p0)                     # lr = 0: the parameters stay
    assert step.steps == 2 and np.any(step.opt_state != 0)
    before = _flat((model, step))
    r = step(x, y)
    assert r.skipped
    _assert_unchanged(model, step, before)


def test_infinite_learning_rate_skips_every_step(backend):
    model, x, y = _zero_grad_case(backend, np.float64)
    step = fr.TrainStep(model, fr.SGD(math.inf))
    before = _flat((model, step))
    assert step(x, y).skipped
    _assert_unchanged(model, step, before)


def test_clipped_update_that_would_be_nonfinite_is_skipped(backend):
    model, x, y = _zero_grad_case(backend, np.float64)
    step = fr.TrainStep(model, fr.Adam(1e-2, eps=0.0), clip=fr.ClipValue(1e-6))
    before = _flat((model, step))
    r = step(x, y)
    assert r.skipped and not r.clipped
    _assert_unchanged(model, step, before)


# ============================================================================
# fault 3: one model from several threads
# ============================================================================
def _batches(n, seed, T=4, B=2):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((T, B, 3)), rng.integers(0, 2, (T, B))) for _ in range(n)]


def _run_threads(fns):
    errors = []
    running = []

    def wrap(f):
        def run():
            try:
                running.append(1)
                while len(running) < len(fns):   # spin: all start at once
                    pass
                f()
            except BaseException as e:       # reported in the main thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(f)) for f in fns]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)      # switch threads as often as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]


def _sequential_order(make, per_thread, losses):
    """Find an interleaving of the threads' batches whose sequential replay
    gives exactly the losses each thread saw (depth-first search, one
    TrainStep replayed with state snapshots). Returns the order or None."""
    model, step = make()

    def snap():
        return model.state_dict(), step.state_dict()

    def restore(s):
        model.load_state_dict(s[0])
        step.load_state_dict(s[1])

    def search(pos):
        if all(p == len(b) for p, b in zip(pos, per_thread)):
            return []
        s = snap()
        for i, b in enumerate(per_thread):
            if pos[i] == len(b):
                continue
            r = step(*b[pos[i]])
            if r.loss == losses[i][pos[i]]:
                rest = search(pos[:i] + (pos[i] + 1,) + pos[i + 1:])
                if rest is not None:
                    return [i] + rest
            restore(s)
        return None

    return search(tuple(0 for _ in per_thread)), model, step


def test_one_train_step_from_two_threads_equals_a_sequential_order(backend):
    def make():
        m = fr.SequenceModel(fr.LSTM(3, 16, dtype=np.float64, seed=0, backend=backend), 2)
        return m, fr.TrainStep(m, fr.SGD(0.1, momentum=0.9))

    model, step = make()
    per_thread = [_batches(16, 10, T=16, B=3), _batches(16, 11, T=16, B=3)]
    losses = [[], []]

    def worker(i):
        def run():
            for x, y in per_thread[i]:
                losses[i].append(step(x, y).loss)
        return run

    _run_threads([worker(0), worker(1)])
    assert step.steps == 32
    order, replay_model, replay_step = _sequential_order(make, per_thread, losses)
    assert order is not None, "the losses match no sequential order of the steps"
    _equal(_flat((model, step)), _flat((replay_model, replay_step)))


def test_layer_and_model_calls_from_threads_equal_sequential_calls(backend):
    core = _core(backend, "lstm")
    model = fr.SequenceModel(core, 2)
    xs = [x for x, _ in _batches(3, 5)]
    ys = [y for _, y in _batches(3, 5)]
    gout = np.random.default_rng(2).standard_normal((4, 2, 3))
    fwd = [core(x) for x in xs]
    bwd, grads = [], []
    for x in xs:
        core(x)
        bwd.append(core.backward(gout))
        grads.append(core.grads)
    mfwd = [model(x) for x in xs]
    flows = [fr.gradient_flow(model, x, y) for x, y in zip(xs, ys)]
    seen = {"fwd": [], "bwd": [], "grads": [], "mfwd": [], "flow": []}

    def worker(i):
        def run():
            for _ in range(3):
                seen["fwd"].append((i, core(xs[i])))
                core(xs[i])
                seen["bwd"].append(core.backward(gout))
                seen["grads"].append(core.grads)
                seen["mfwd"].append((i, model(xs[i])))
                seen["flow"].append((i, fr.gradient_flow(model, xs[i], ys[i])))
        return run

    _run_threads([worker(i) for i in range(3)])
    same = _same(backend)
    for key, ref in (("fwd", fwd), ("mfwd", mfwd), ("flow", flows)):
        for i, got in seen[key]:
            same(got, ref[i])

    def matches_one(got, refs):   # through the last forward, of any thread
        for ref in refs:
            try:
                same(got, ref)
                return True
            except AssertionError:
                pass
        return False

    assert all(matches_one(g, bwd) for g in seen["bwd"])
    assert all(matches_one(g, grads) for g in seen["grads"])


class _CountingLock:
    """A re-entrant lock that counts acquisitions."""

    def __init__(self):
        self._lock = threading.RLock()
        self.count = 0

    def __enter__(self):
        self._lock.acquire()
        self.count += 1
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def acquire(self, *a, **kw):
        ok = self._lock.acquire(*a, **kw)
        self.count += ok
        return ok

    def release(self):
        self._lock.release()


def test_every_entry_point_takes_the_models_lock(backend):
    core = _core(backend, "tanh")
    model = fr.SequenceModel(core, 2)
    assert model._lock is core._lock              # the model and its core: one lock
    lock = _CountingLock()
    core._lock = lock
    x, y = _batches(1, 0)[0]
    step = fr.TrainStep(model, fr.SGD(0.1))
    for call in (lambda: core(x), lambda: core.backward(np.zeros((4, 2, 3))),
                 lambda: model(x), lambda: step(x, y),
                 lambda: fr.gradient_flow(model, x, y),
                 lambda: model.state_dict(), lambda: model.load_state_dict(model.state_dict()),
                 lambda: step.state_dict(), lambda: core.state_dict()):
        n = lock.count
        call()
        assert lock.count > n


def test_two_models_do_not_share_a_lock(backend):
    """While one model's lock is held, another model trains to the end in
    another thread: they can run in parallel."""
    a = fr.SequenceModel(_core(backend, "tanh"), 2)
    b = fr.SequenceModel(_core(backend, "tanh"), 2)
    assert a._lock is not b._lock
    step_b = fr.TrainStep(b, fr.SGD(0.1))
    done = []
    with a._lock:
        t = threading.Thread(target=lambda: done.append(step_b(*_batches(1, 0)[0])))
        t.start()
        t.join(600)
    assert done and not done[0].skipped and step_b.steps == 1


def test_cell_takes_its_lock(backend):
    cell = fr.LSTMCell(3, 3, backend=backend)
    lock = _CountingLock()
    cell._lock = lock
    cell(np.zeros((2, 3), np.float32))
    cell.backward((np.ones((2, 3), np.float32), None))
    assert lock.count >= 2


# ============================================================================
# fault 13: NaN/inf at padding steps is ignored
# ============================================================================
def _padded(tok, fill, seed=0, T=5, B=3, lengths=(5, 2, 1)):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, (T, B)) if tok else rng.standard_normal((T, B, 3))
    pad = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]
    x[pad] = fill(rng, x[pad].shape)
    return x, np.array(lengths)


def _all_results(backend, mode, x, lengths, bidirectional=False):
    core = _core(backend, mode, bidirectional=bidirectional, num_layers=2)
    out, hn = core(x, lengths=lengths)
    dx, dh = core.backward(np.ones_like(out))
    model = fr.SequenceModel(_core(backend, mode, bidirectional=bidirectional), 2)
    y = np.zeros(x.shape[:2], dtype=np.int64)
    flow = fr.gradient_flow(model, x, y, lengths=lengths)
    z = model(x, lengths=lengths)
    step = fr.TrainStep(model, fr.Adam(0.01))
    r = step(x, y, lengths=lengths)
    return dict(layer=(out, hn, dx, dh, core.grads), flow=flow, z=z,
                step=(r.loss, r.grad_norm, r.skipped, r.hx), params=_flat((model, step)))


@pytest.mark.parametrize("mode", ["tanh", "lstm"])
@pytest.mark.parametrize("junk", ["nan", "inf", "finite"])
def test_nonfinite_float_padding_is_ignored(backend, mode, junk):
    fills = {"nan": lambda rng, s: np.full(s, np.nan),
             "inf": lambda rng, s: np.where(rng.random(s) < 0.5, np.inf, -np.inf),
             "finite": lambda rng, s: 1e30 * rng.standard_normal(s)}
    zero, lengths = _padded(False, lambda rng, s: np.zeros(s))
    bad, _ = _padded(False, fills[junk])
    for bidi in (False, True):
        want = _all_results(backend, mode, zero, lengths, bidi)
        got = _all_results(backend, mode, bad, lengths, bidi)
        assert not got["step"][2]
        _same(backend)(got, want)


def test_token_ids_at_padding_are_ignored_when_valid_refused_when_out_of_range(backend):
    zero, lengths = _padded(True, lambda rng, s: np.zeros(s, np.int64))
    other, _ = _padded(True, lambda rng, s: rng.integers(0, 3, s))
    _same(backend)(_all_results(backend, "lstm", other, lengths),
                   _all_results(backend, "lstm", zero, lengths))
    bad = zero.copy()
    bad[4, 2] = 3                     # a padding step of sequence 2 (length 1)
    core = _core(backend, "tanh")
    model = fr.SequenceModel(core, 2)
    before = _flat(model)
    with pytest.raises(ValueError, match=r"x: token ids must be in \[0, 3\)"):
        core(bad, lengths=lengths)
    with pytest.raises(ValueError, match=r"x: token ids must be in \[0, 3\)"):
        fr.TrainStep(model, fr.SGD(0.1))(bad, np.zeros((5, 3), int), lengths=lengths)
    _equal(_flat(model), before)


def test_nan_padding_batch_first_and_readout_last(backend):
    zero, lengths = _padded(False, lambda rng, s: np.zeros(s))
    bad, _ = _padded(False, lambda rng, s: np.full(s, np.nan))
    res = []
    for x in (zero, bad):
        core = fr.RNN(3, 3, dtype=np.float64, seed=0, backend=backend, batch_first=True)
        model = fr.SequenceModel(core, 2, loss="mse", readout="last")
        step = fr.TrainStep(model, fr.SGD(0.1))
        r = step(np.swapaxes(x, 0, 1), np.ones((3, 2)), lengths=lengths)
        res.append((r.loss, r.skipped, _flat(model)))
    assert not res[1][1]
    _same(backend)(res[1], res[0])


# ============================================================================
# fault 14: argument ranges as PyTorch's
# ============================================================================
VALUES = [-1.0, -1e-12, -0.0, 0.0, 1e-12, 0.5, 0.999, 1.0, 1.5, 1e300, math.inf,
          -math.inf, math.nan, 0, 2]


def _accepts(f):
    try:
        f()
        return True
    except (ValueError, TypeError):
        return False


# where fastrnn deliberately refuses what torch lets through: NaN (torch's SGD
# passes it through its `lr < 0` check; its Adam and Adagrad refuse it)
def _deviation(v):
    return isinstance(v, float) and math.isnan(v)


@pytest.mark.parametrize("ours,theirs", [
    (lambda v: fr.SGD(v), lambda p, v: ("torch.optim.SGD", dict(lr=v))),
    (lambda v: fr.SGD(0.1, momentum=v), lambda p, v: ("torch.optim.SGD", dict(lr=0.1, momentum=v))),
    (lambda v: fr.Adam(v), lambda p, v: ("torch.optim.Adam", dict(lr=v))),
    (lambda v: fr.Adam(eps=v), lambda p, v: ("torch.optim.Adam", dict(eps=v))),
    (lambda v: fr.Adam(betas=(v, 0.9)), lambda p, v: ("torch.optim.Adam", dict(betas=(v, 0.9)))),
    (lambda v: fr.Adam(betas=(0.9, v)), lambda p, v: ("torch.optim.Adam", dict(betas=(0.9, v)))),
    (lambda v: fr.Adagrad(v), lambda p, v: ("torch.optim.Adagrad", dict(lr=v))),
    (lambda v: fr.Adagrad(eps=v), lambda p, v: ("torch.optim.Adagrad", dict(eps=v))),
], ids=["sgd-lr", "sgd-momentum", "adam-lr", "adam-eps", "adam-beta1", "adam-beta2",
        "adagrad-lr", "adagrad-eps"])
def test_optimizer_ranges_match_torch(ours, theirs):
    torch = pytest.importorskip("torch")
    p = [torch.nn.Parameter(torch.zeros(2))]
    for v in VALUES:
        # torch's Adam takes betas as floats only (a type rule, not a range)
        cls, kw = theirs(p, float(v) if type(v) is int else v)
        ctor = getattr(torch.optim, cls.rsplit(".", 1)[1])
        t = _accepts(lambda: ctor(p, **kw))
        f = _accepts(lambda: ours(v))
        if _deviation(v):
            assert not f, f"{v!r} should be refused"
        else:
            assert f == t, f"value {v!r}: fastrnn accepts={f}, torch accepts={t}"


def test_refusals_name_the_argument():
    for f, name in ((lambda: fr.SGD(-1.0), "lr"), (lambda: fr.SGD(0.1, momentum=math.nan), "momentum"),
                    (lambda: fr.Adam(eps=-1e-9), "eps"), (lambda: fr.Adam(betas=(1.0, 0.9)), r"betas\[0\]"),
                    (lambda: fr.Adagrad(lr=math.nan), "lr"), (lambda: fr.ClipNorm(-1.0), "max_norm"),
                    (lambda: fr.ClipValue(math.nan), "limit")):
        with pytest.raises(ValueError, match=name):
            f()
    with pytest.raises(TypeError, match="lr"):
        fr.SGD("0.1")


@pytest.mark.parametrize("v", [0.0, 1e-12, 0.5, 3.0, 1e300, math.inf, 2])
def test_clip_ranges_and_results_match_torch(v):
    """Every limit torch's clip_grad_norm_/clip_grad_value_ give a meaning to
    (>= 0, inf included) is accepted, and clips as torch does."""
    torch = pytest.importorskip("torch")
    from fastrnn.backends import reference
    g = np.array([1.0, -2.0, 3.0, 0.5])
    for clip, tfn in ((fr.ClipNorm(v), torch.nn.utils.clip_grad_norm_),
                      (fr.ClipValue(v), torch.nn.utils.clip_grad_value_)):
        p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        p.grad = torch.tensor(g)
        tfn([p], v)
        ours = g.copy()
        params, state = np.zeros(4), np.zeros((2, 4))
        reference.clip_and_update(ours, params, state, 1, opt="sgd",
                                  hyper=dict(lr=1.0, momentum=0.0), clip=clip.kind,
                                  limit=clip.limit)
        # torch's norm clip divides by (norm + 1e-6): equal within that
        np.testing.assert_allclose(-params, p.grad.numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("v", [-1.0, -1e-12, -math.inf, math.nan])
def test_clip_limits_without_meaning_are_refused(v):
    """torch accepts these silently: a negative max_norm flips every gradient,
    a negative limit clamps everything to -limit, NaN poisons everything."""
    with pytest.raises(ValueError, match="max_norm"):
        fr.ClipNorm(v)
    with pytest.raises(ValueError, match="limit"):
        fr.ClipValue(v)


def test_zero_learning_rate_is_a_frozen_step(backend):
    """lr=0 as in PyTorch (warm-up from 0): parameters stay, the optimizer
    state and the step count advance exactly as with any other lr."""
    model, x, y = _zero_grad_case(backend, np.float64)
    x[..., 0] = 1
    for opt in (fr.SGD(0.0, momentum=0.9), fr.Adam(0.0), fr.Adagrad(0.0)):
        step = fr.TrainStep(model, opt)
        p0 = _flat(model)
        r = step(x, y)
        assert not r.skipped and step.steps == 1
        _equal(_flat(model), p0)
        assert np.any(step.opt_state[0] != 0)
    ref = fr.SequenceModel(fr.RNN(3, 4, dtype=np.float64, seed=0, backend="numpy"), 2)
    rstep = fr.TrainStep(ref, fr.Adam(0.0))
    rstep(x, y)
    step = fr.TrainStep(model, fr.Adam(0.0))
    step(x, y)
    assert_close(step.opt_state, rstep.opt_state)
