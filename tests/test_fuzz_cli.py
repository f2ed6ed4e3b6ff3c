"""Property tests (Hypothesis) for checkpoints and the command line: for every
generated input, either a clear refusal (a ValueError naming the file for
``fr.load``; a one-line ``fastrnn CMD: error:`` and exit 1 or 2 for the
command line) or a correct result -- never another exception, a traceback, a
partial file or a run directory left behind by a refused command.

Bounded for CI (a few seconds per property); ``FASTRNN_FUZZ=long`` selects a
profile with many more examples.
"""
import contextlib
import functools
import io
import json
import os
import shutil
import sys
import tempfile
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrnn as fr
from fastrnn import checkpoint, cli

settings.register_profile("fastrnn-cli-ci", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fastrnn-cli-long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
LONG = os.environ.get("FASTRNN_FUZZ") == "long"
PROFILE = settings.get_profile("fastrnn-cli-long" if LONG else "fastrnn-cli-ci")


def fuzz(scale=1.0):
    """The profile's settings, with `scale` times its number of examples."""
    return settings(PROFILE, max_examples=max(1, int(PROFILE.max_examples * scale)))


BACKENDS = [b for b in ("numpy", "numba", "c") if fr.available_backends()[b][0]]


def _params_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]) for k in sa)


def _deep_equal(a, b):
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype
                and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if isinstance(a, np.random.Generator):
        return (isinstance(b, np.random.Generator)
                and json.dumps(a.bit_generator.state, default=repr)
                == json.dumps(b.bit_generator.state, default=repr))
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_deep_equal(x, y) for x, y in zip(a, b)))
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(_deep_equal(a[k], b[k]) for k in a))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b


def _global_rng_state():
    s = np.random.get_state()
    return (s[0], s[1].tobytes()) + tuple(s[2:])


# -- save / load -------------------------------------------------------------------

@st.composite
def models(draw):
    cell = draw(st.sampled_from(["rnn", "lstm"]))
    kw = dict(num_layers=draw(st.integers(1, 2)), bias=draw(st.booleans()),
              batch_first=draw(st.booleans()), bidirectional=draw(st.booleans()),
              dtype=draw(st.sampled_from([np.float32, np.float64])),
              seed=draw(st.none() | st.integers(0, 2 ** 40)),
              backend=draw(st.sampled_from(BACKENDS)))
    inits = ["default", "orthogonal", "xavier"] + (["identity"] if cell == "rnn" else [])
    kw["init"] = draw(st.sampled_from(inits))
    I, H = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if cell == "lstm":
        core = fr.LSTM(I, H, **kw)
    else:
        core = fr.RNN(I, H, nonlinearity=draw(st.sampled_from(["tanh", "relu", "sigmoid"])),
                      **kw)
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    return fr.SequenceModel(core, draw(st.integers(1, 3)), loss=loss,
                            readout=draw(st.sampled_from(["all", "last"])))


def optimizers():
    lr = st.floats(1e-4, 1.0)
    return st.one_of(
        st.builds(fr.SGD, lr, momentum=st.floats(0.0, 0.99)),
        st.builds(lambda lr, b1, b2, eps: fr.Adam(lr, betas=(b1, b2), eps=eps),
                  lr, st.floats(0.0, 0.99), st.floats(0.0, 0.999), st.floats(1e-10, 1e-3)),
        st.builds(fr.Adagrad, lr, eps=st.floats(1e-10, 1e-3)))


def generators():
    return st.builds(lambda name, seed, n: _advanced(name, seed, n),
                     st.sampled_from(sorted(checkpoint.BIT_GENERATORS)),
                     st.integers(0, 2 ** 64), st.integers(0, 5))


def _advanced(name, seed, n):
    g = np.random.Generator(checkpoint.BIT_GENERATORS[name](seed))
    g.random(n)
    return g


def arrays():
    return st.builds(lambda kind, shape, seed: _array(kind, shape, seed),
                     st.sampled_from(["f4", "f8", "i8", "u1", "b1"]),
                     st.lists(st.integers(0, 3), max_size=3), st.integers(0, 99))


def _array(kind, shape, seed):
    a = np.random.default_rng(seed).standard_normal(shape) * 10
    return np.asarray(a).astype(kind)


scalars = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
extras = st.dictionaries(
    st.text(max_size=6),
    st.recursive(scalars | arrays() | generators(),
                 lambda inner: (st.lists(inner, max_size=3)
                                | st.lists(inner, max_size=3).map(tuple)
                                | st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                 max_leaves=8),
    max_size=4)


def _train(model, opt, n, seed):
    if model.core.batch_first:
        n = 0                   # (the layout of x differs; the moments are what matter)
    ts = fr.TrainStep(model, opt, clip=fr.ClipNorm(1.0) if seed % 2 else None)
    rng = np.random.default_rng(seed)
    T, B, I, O = 3, 2, model.core.input_size, model.output_size
    for _ in range(n):
        x = rng.standard_normal((T, B, I))
        if model.readout == "all":
            y = rng.integers(0, O, (T, B)) if model.loss == "cross_entropy" else \
                rng.standard_normal((T, B, O))
        else:
            y = rng.integers(0, O, B) if model.loss == "cross_entropy" else \
                rng.standard_normal((B, O))
        ts(x, y)
    return ts


@fuzz(1.0)
@given(model=models(), opt=optimizers(), n=st.integers(0, 2),
       step=st.none() | st.integers(0, 10 ** 6), extra=extras, with_ts=st.booleans(),
       seed=st.integers(0, 9))
def test_save_load_round_trip(model, opt, n, step, extra, with_ts, seed):
    ts = _train(model, opt, n, seed) if with_ts else None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ck.npz")
        fr.save(path, model, step, train_step=ts, extra=extra)
        assert os.listdir(d) == ["ck.npz"]
        ck = fr.load(path)
    assert ck.step == step and _params_equal(model, ck.model)
    assert ck.model.backend == model.backend and ck.model.core.dtype == model.core.dtype
    assert _deep_equal(extra, ck.extra)
    if with_ts:
        assert ck.train_step.steps == ts.steps
        assert ck.train_step.optimizer.hyper == ts.optimizer.hyper
        np.testing.assert_array_equal(ck.train_step.opt_state, ts.opt_state)
    x = np.random.default_rng(seed).standard_normal((2, 2, model.core.input_size))
    np.testing.assert_array_equal(model(x)[0], ck.model(x)[0])


@functools.lru_cache(maxsize=None)
def _reference_file():
    """The bytes of a small checkpoint with a TrainStep and extra, and the model."""
    model = fr.SequenceModel(fr.LSTM(2, 3, num_layers=2, seed=1, backend="numpy"), 2)
    ts = _train(model, fr.Adam(1e-2), 2, 0)
    extra = {"rng": np.random.default_rng(5), "hx": (np.ones((2, 1, 3)), np.zeros((2, 1, 3))),
             "counters": {"a": 1}}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ck.npz")
        fr.save(path, model, 7, train_step=ts, extra=extra)
        with open(path, "rb") as f:
            return f.read(), model, extra


def _load_or_refuse(data):
    """fr.load on a file holding `data`: the Checkpoint, or None when it was
    refused with a ValueError naming the file. Anything else fails the test.
    The global NumPy random state must be left as it was."""
    before = _global_rng_state()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fuzzed.npz")
        with open(path, "wb") as f:
            f.write(data)
        try:
            ck = fr.load(path)
        except ValueError as e:
            assert "fuzzed.npz" in str(e), e
            ck = None
    assert _global_rng_state() == before
    return ck


@fuzz(2.0)
@given(cut=st.none() | st.integers(0, 10 ** 5), flips=st.lists(
    st.tuples(st.integers(0, 10 ** 5), st.integers(1, 255)), max_size=3),
    insert=st.none() | st.tuples(st.integers(0, 10 ** 5), st.binary(min_size=1, max_size=9)))
def test_a_damaged_checkpoint_is_refused_or_harmless(cut, flips, insert):
    data, model, extra = _reference_file()
    b = bytearray(data)
    for pos, x in flips:
        b[pos % len(b)] ^= x
    if insert is not None:
        pos, junk = insert
        b[pos % len(b):pos % len(b)] = junk
    if cut is not None:
        del b[cut % len(b):]
    ck = _load_or_refuse(bytes(b))
    if ck is not None:              # a change that does not matter (a timestamp, ...)
        assert ck.step == 7 and _params_equal(ck.model, model)
        assert _deep_equal(extra, ck.extra)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 20, 10 ** 20) | st.integers(-3, 9000)
    | st.floats() | st.text(max_size=10)
    | st.sampled_from(["lstm", "rnn", "tanh", "float64", "object", "seed", "test",
                       "PCG64", "MT19937", "sgd", "adam", "norm", "value", "extra/0",
                       "param/weight_ih_l0"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)


def _paths(doc, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _with_meta(data, edit):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.npz")
        with open(path, "wb") as f:
            f.write(data)
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(bytes(arrays["meta"]).decode())
        meta = edit(meta)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue(), meta


@fuzz(3.0)
@given(data=st.data())
def test_a_crafted_meta_document_is_refused_or_consistent(data):
    raw, model, _ = _reference_file()
    paths = []

    def collect(meta):
        paths.extend(p for p, _ in _paths(meta) if p)
        return meta
    _with_meta(raw, collect)
    where = data.draw(st.sampled_from(paths), label="field")
    action = data.draw(st.sampled_from(["replace", "delete"]), label="action")
    value = data.draw(json_values, label="value")

    def edit(meta):
        node = meta
        for k in where[:-1]:
            node = node[k]
        if action == "delete" and isinstance(node, dict):
            del node[where[-1]]
        else:
            node[where[-1]] = value
        return meta
    crafted, meta = _with_meta(raw, edit)
    built = []
    real = checkpoint._build_model

    def spy(cfg, backend):
        m = real(cfg, backend)
        built.append(m)
        return m
    with mock.patch.object(checkpoint, "_build_model", spy):
        ck = _load_or_refuse(crafted)
    for m in built:                 # whatever was built holds exactly the stored arrays
        assert m.num_parameters() == model.num_parameters()
    if ck is not None:
        assert _params_equal(ck.model, model)


@fuzz(2.0)
@given(name=st.text(max_size=12) | st.sampled_from(
    sorted(checkpoint.BIT_GENERATORS) + ["seed", "test", "default_rng", "RandomState",
                                          "Generator", "__class__", "bit_generator"]),
    state=st.none() | json_values | st.builds(
        lambda s, inc: {"state": s, "inc": inc}, json_values, json_values))
def test_a_crafted_generator_is_refused_or_a_generator(name, state):
    raw, _, _ = _reference_file()

    def edit(meta):
        g = meta["extra"]["rng"]["__generator__"]
        g["bit_generator"] = name
        if state is not None:
            g["state"] = state
        return meta
    crafted, _ = _with_meta(raw, edit)
    ck = _load_or_refuse(crafted)
    if ck is not None:
        assert name in checkpoint.BIT_GENERATORS
        rng = ck.extra["rng"]
        assert type(rng.bit_generator).__name__ == name
        rng.random(2)


# -- the command line ----------------------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@functools.lru_cache(maxsize=None)
def _text_file():
    d = tempfile.mkdtemp(prefix="fastrnn-fuzz-text-")
    path = os.path.join(d, "corpus.txt")
    with open(path, "w") as f:
        f.write(TEXT)
    return path


def _invoke(argv):
    """cli.main(argv) in the current directory without matplotlib: (exit code,
    stdout, stderr). Only SystemExit may escape cli.main."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _no_matplotlib():
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _no_matplotlib():
    """Hide matplotlib (no pictures: faster). Only these two entries of
    sys.modules are put back (mock.patch.dict would also drop every module
    imported meanwhile, and numba cannot import its modules twice)."""
    keys = ("matplotlib", "matplotlib.figure")
    saved = {k: sys.modules[k] for k in keys if k in sys.modules}
    sys.modules.update(dict.fromkeys(keys))
    try:
        yield
    finally:
        for k in keys:
            sys.modules.pop(k, None)
        sys.modules.update(saved)


def _error_line(err, command):
    """The error of a refused command: argparse's usage lines then one
    'fastrnn CMD: error:' line, or that line alone (warnings may precede it)."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(f"fastrnn {command}: error: "), err
    return lines[-1]


def _pos(*vals):
    return st.sampled_from([str(v) for v in vals])


BAD_NUMBER = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e39", "abc", "-0", "1e400"])
BAD_INT = st.sampled_from(["0", "-1", "x", "1.5", "-99999999999"])
# option: (valid values, invalid values)
OPTIONS = {
    "--task": (st.sampled_from(["adding", "temporal-order", "order", "memorization",
                                "char"]), st.sampled_from(["parity", "", "ADDING"])),
    "--cell": (st.sampled_from(["lstm", "rnn"]), st.sampled_from(["gru", ""])),
    "--nonlinearity": (st.sampled_from(["tanh", "relu", "sigmoid"]), st.just("elu")),
    "--init": (st.sampled_from(["default", "orthogonal", "identity", "xavier"]),
               st.just("zeros")),
    "--forget-bias": (st.floats(-5, 5).map(repr), BAD_NUMBER.filter(
        lambda v: v not in ("-1", "0", "-0"))),
    "--layers": (_pos(1, 2), BAD_INT),
    "--dtype": (st.sampled_from(["float32", "float64"]), st.just("float16")),
    "--optimizer": (st.sampled_from(["adam", "sgd", "adagrad"]), st.just("lbfgs")),
    "--lr": (st.floats(1e-4, 1.0).map(repr), BAD_NUMBER),
    "--momentum": (st.floats(0, 0.99).map(repr), BAD_NUMBER.filter(
        lambda v: v not in ("0", "-0"))),
    "--clip-norm": (st.floats(1e-3, 10).map(repr), BAD_NUMBER),
    "--clip-value": (st.floats(1e-3, 10).map(repr), BAD_NUMBER),
    "--state-clip": (st.floats(1e-3, 10).map(repr), BAD_NUMBER),
    "--seed": (_pos(0, 1, 2, 2 ** 40), st.sampled_from(["-1", "x"])),
    "--eval-every": (_pos(1, 2, 5), BAD_INT),
    "--checkpoint-every": (_pos(1, 2), BAD_INT),
    "--backend": (st.sampled_from(["auto"] + BACKENDS), st.sampled_from(["cuda", "vulkan"])),
    # always given (from small ranges) so that a run is tiny
    "--T": (_pos(3, 4, 6), st.sampled_from(["0", "-2", "x"])),
    "--hidden": (_pos(1, 2, 3), BAD_INT),
    "--batch": (_pos(1, 2, 3), BAD_INT),
    "--steps": (_pos(1, 2, 3), BAD_INT),
    "--test-size": (_pos(1, 2, 5), BAD_INT),
}
ALWAYS = ["--T", "--hidden", "--batch", "--steps", "--test-size"]
FLAGS = ["--bidirectional", "--no-clip", "--stop", "--no-stop", "--require-solved"]


@st.composite
def train_argv(draw, always=ALWAYS):
    """Options with valid values, except (half of the time) one invalid value."""
    names = list(always) + draw(st.lists(
        st.sampled_from([k for k in OPTIONS if k not in ALWAYS]), max_size=5, unique=True))
    bad = draw(st.none() | st.sampled_from(names)) if names else None
    argv = []
    for opt in names:
        argv += [opt, draw(OPTIONS[opt][opt == bad])]
    argv += draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True))
    if draw(st.booleans()):
        argv += ["--text", _text_file()]
    argv += ["--progress", draw(st.sampled_from(["none", "log"]))]
    return argv


def _names_an_option(line, argv):
    """Whether an error line names one of the options in argv ('--lr', 'T:'),
    or --text (which the char task needs)."""
    opts = [a for a in argv if a.startswith("--")] + ["--text"]
    return any(o in line or f"{o[2:]}:" in line for o in opts)


def _check_run_dir(out, steps_done):
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert recs[0]["type"] == "config"
    steps = [r["step"] for r in recs if r["type"] == "step"]
    assert steps == list(range(1, len(steps) + 1))
    ck = fr.load(out)
    assert ck.step == steps_done and ck.train_step.steps <= steps_done


@fuzz(1.2)
@given(argv=train_argv())
def test_train_arguments_run_or_give_a_one_line_error(argv):
    with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):
        code, out, err = _invoke(["train", *argv, "--out", "run"])
        if code == 0 or (code == 1 and "--require-solved" in argv
                         and "fastrnn train: error" not in err):
            assert "Traceback" not in err
            s = json.load(open(os.path.join("run", "summary.json")))
            _check_run_dir("run", s["steps"])
        elif code == 1:
            line = _error_line(err, "train")
            assert len([ln for ln in err.splitlines()
                        if ln.strip() and not ln.startswith("warning: ")]) == 1, err
            assert "skipped" in line or ": " in line
        else:
            assert code == 2, (code, err)
            assert _names_an_option(_error_line(err, "train"), argv), err
            assert os.listdir(".") == [], os.listdir(".")   # nothing created


@functools.lru_cache(maxsize=None)
def _finished_runs():
    """A finished tiny train run and a char run (for sample), in a temp dir."""
    d = tempfile.mkdtemp(prefix="fastrnn-fuzz-runs-")
    base = ["--T", "4", "--hidden", "3", "--batch", "2", "--test-size", "4",
            "--eval-every", "2", "--no-stop", "--progress", "none"]
    runs = {}
    for name, extra in (("adding", []), ("char", ["--task", "char", "--text", _text_file()])):
        out = os.path.join(d, name)
        code, _, err = _invoke(["train", *base, *extra, "--steps", "4", "--out", out])
        assert code == 0, err
        runs[name] = out
    return runs


@fuzz(0.6)
@given(opts=train_argv(always=[]), steps=st.sampled_from(["5", "6", "4", "2", "0"]),
       partial=st.none() | st.integers(1, 60))
def test_resume_arguments_continue_or_give_a_one_line_error(opts, steps, partial):
    src = _finished_runs()["adding"]
    with tempfile.TemporaryDirectory() as d:
        run = os.path.join(d, "run")
        shutil.copytree(src, run)
        if partial is not None:         # a crash in the middle of writing a record
            record = json.dumps({"type": "step", "step": 5, "loss": 0.25, "grad_norm": 1.0,
                                 "clipped": 0, "skipped": 0}) + "\n"
            with open(os.path.join(run, "metrics.jsonl"), "a") as f:
                f.write(record[:partial % len(record)])
        argv = ["train", "--resume", run, *opts, "--steps", steps]
        code, out, err = _invoke(argv)
        if code == 0 or (code == 1 and "--require-solved" in argv
                         and "fastrnn train: error" not in err):
            _check_run_dir(run, max(4, int(steps)))
        else:
            assert code == 2, (code, err)
            assert _names_an_option(_error_line(err, "train"), argv), err


@fuzz(1.0)
@given(length=st.integers(-3, 30),
       temperature=st.floats(0, 5).map(repr) | BAD_NUMBER,
       prime=st.text(alphabet="the quickbrownfx.Z\n", max_size=6),
       seed=st.none() | st.sampled_from(["0", "7", "-1", "x", "2" * 30]))
def test_sample_arguments_sample_or_give_a_one_line_error(length, temperature, prime, seed):
    run = _finished_runs()["char"]
    argv = ["sample", run, "--length", str(length), "--temperature", temperature,
            "--prime", prime]
    if seed is not None:
        argv += ["--seed", seed]
    code, out, err = _invoke(argv)
    if code == 0:
        assert out.startswith(prime) and len(out) == len(prime) + length + 1
        assert set(out[len(prime):-1]) <= set(TEXT)
    else:
        assert code == 2, (code, err)
        line = _error_line(err, "sample")
        assert any(o in line for o in ("--length", "--temperature", "--prime", "--seed")), line


@fuzz(1.0)
@given(data=st.binary(max_size=200) | st.sampled_from([b"", b"PK\x03\x04", b"\x93NUMPY"]),
       command=st.sampled_from(["resume", "sample"]))
def test_not_a_checkpoint_on_the_command_line(data, command):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "file.npz")
        with open(path, "wb") as f:
            f.write(data)
        argv = ["train", "--resume", path] if command == "resume" else ["sample", path]
        code, _, err = _invoke(argv)
        assert code == 2
        line = _error_line(err, argv[0])
        assert path in line and "not a fastrnn checkpoint" in line
        assert sorted(os.listdir(d)) == ["file.npz"]


def test_profiles_are_keyed_on_the_environment():
    assert PROFILE is settings.get_profile("fastrnn-cli-long" if LONG else "fastrnn-cli-ci")
    assert settings.get_profile("fastrnn-cli-long").max_examples > \
        settings.get_profile("fastrnn-cli-ci").max_examples


@pytest.mark.parametrize("seed", ["-1", "x"])
def test_sample_seed_is_validated(seed):
    code, _, err = _invoke(["sample", _finished_runs()["char"], "--seed", seed])
    assert code == 2 and "--seed" in _error_line(err, "sample")
