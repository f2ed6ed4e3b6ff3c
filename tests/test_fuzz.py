"""Fuzz suite (issue 13): Hypothesis properties over the public API -- the
layers, SequenceModel, TrainStep and gradient_flow -- on every available CPU
backend (numpy, numba, c), with valid and invalid inputs: wrong shapes,
ranks and dtypes, bad lengths, bad ids, NaN (at valid and at padding
steps), read-only and non-contiguous arrays, Python lists, bad options.

For every generated case one of two things must happen:
- a ValueError/TypeError whose message names the argument that was made bad
  (FloatingPointError for a non-finite step with on_nonfinite="raise"), the
  same as the reference backend's, with parameters, optimizer state and step
  count bitwise unchanged;
- a result equal to the NumPy reference backend's within the tolerance
  table of conftest.py (the same NaN positions), and the same decision to
  skip a step.
Never another exception type, a crash, or a partial update.

Shapes are tiny (T <= 5, B <= 3, H <= 4). The "ci" profile is bounded (well
under two minutes for the file); FASTRNN_FUZZ=long runs the long one.
"""
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import given
from hypothesis import strategies as st

import fastrnn as fr
from conftest import RTOL

settings.register_profile("fastrnn-fuzz-ci", max_examples=50, deadline=None,
                          suppress_health_check=list(HealthCheck), derandomize=True,
                          database=None, print_blob=True)
settings.register_profile("fastrnn-fuzz-long", max_examples=400, deadline=None,
                          suppress_health_check=list(HealthCheck), print_blob=True)
FUZZ = settings.get_profile("fastrnn-fuzz-long" if os.environ.get("FASTRNN_FUZZ") == "long"
                            else "fastrnn-fuzz-ci")

BACKENDS = [b for b in ("numba", "c") if fr.available_backends()[b][0]]
ALL = ["numpy"] + BACKENDS
MODES = ["tanh", "relu", "sigmoid", "lstm"]


# ============================================================================
# comparing outcomes
# ============================================================================
def _close(actual, expected, dtype, what):
    """Equal within the tolerance table, NaN and inf at the same places."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{what}: NaN at")
    fin = np.isfinite(e)
    np.testing.assert_array_equal(np.where(fin, 0, a), np.where(fin, 0, e),
                                  err_msg=f"{what}: inf at")
    rtol = RTOL[np.dtype(dtype)]
    scale = float(np.max(np.abs(e[fin]))) if fin.any() else 0.0
    np.testing.assert_allclose(a[fin], e[fin], rtol=rtol, atol=rtol * max(scale, 1e-30),
                               err_msg=what)


def _close_tree(a, e, dtype, what):
    if isinstance(e, dict):
        assert sorted(a) == sorted(e), what
        for k in e:
            _close_tree(a[k], e[k], dtype, f"{what}[{k}]")
    elif isinstance(e, (tuple, list)):
        assert isinstance(a, (tuple, list)) and len(a) == len(e), what
        for i, (u, v) in enumerate(zip(a, e)):
            _close_tree(u, v, dtype, f"{what}[{i}]")
    elif e is None:
        assert a is None, what
    else:
        _close(a, e, dtype, what)


def _bitwise(a, b, what):
    if isinstance(a, dict):
        for k in a:
            _bitwise(a[k], b[k], f"{what}[{k}]")
    elif isinstance(a, (tuple, list)):
        for u, v in zip(a, b):
            _bitwise(u, v, what)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)


def _outcome(f):
    """('ok', result) or ('error', exception)."""
    try:
        return "ok", f()
    except (ValueError, TypeError, FloatingPointError) as e:
        return "error", e


def _names_a_bad_argument(err, bad):
    """The message starts with the argument's name ('x: ...', 'hx[1] (c0):
    ...', 'betas[0]: ...'), one of those made bad."""
    m = re.match(r"([A-Za-z_]\w*)", str(err))
    return m is not None and m.group(1) in bad


def _same_outcome(ref, got, bad, dtype, what):
    """The property: the same error as the reference, naming a bad
    argument, or a result equal to the reference's."""
    kind, val = got
    rkind, rval = ref
    if kind == "error" and not isinstance(val, FloatingPointError):
        assert bad, f"{what}: a valid call raised {type(val).__name__}: {val}"
        assert _names_a_bad_argument(val, bad), (
            f"{what}: {type(val).__name__}: {val!r} does not name one of {sorted(bad)}")
    assert kind == rkind, f"{what}: {kind} ({val!r}) where the reference gave {rkind} ({rval!r})"
    if kind == "error":
        assert type(val) is type(rval), (val, rval)
        if not isinstance(val, FloatingPointError):   # that one quotes the numbers
            assert str(val) == str(rval), (val, rval)
    else:
        assert not bad, f"{what}: accepted bad argument(s) {sorted(bad)}"
        _close_tree(val, rval, dtype, what)


# ============================================================================
# generated inputs: (value, names of the arguments made bad)
# ============================================================================
def _frozen(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def _draw_x(data, cfg, T, B, lengths):
    """A sequence input in the layer's layout, maybe broken or odd."""
    I, bf = cfg["I"], cfg["batch_first"]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "x seed"))
    lead = (B, T) if bf else (T, B)
    tokens = data.draw(st.booleans(), "tokens")
    x = rng.integers(0, I, lead) if tokens else rng.standard_normal(lead + (I,))
    how = data.draw(st.sampled_from(
        ["plain", "plain", "readonly", "list", "strided", "other dtype", "nan padding",
         "nan valid", "rank", "size", "bool", "complex", "empty", "id high", "id negative",
         "id at padding"]), "x how")
    pad = np.arange(T)[:, None] >= np.asarray(lengths if lengths is not None else [T] * B)[None]
    if bf:
        pad = pad.T
    if how == "readonly":
        return _frozen(x), set()
    if how == "list":
        return x.tolist(), set()
    if how == "strided":
        return np.stack([x, x], axis=-1)[..., 1], set()     # a non-contiguous view
    if how == "other dtype":
        return x.astype(np.int32 if tokens else np.float16), set()
    if how == "nan padding" and not tokens and pad.any():
        x[pad] = rng.choice([np.nan, np.inf, -np.inf], size=x[pad].shape)
        return x, set()
    if how == "nan valid" and not tokens:
        x[(0,) * (x.ndim - 1)] = np.nan
        return x, set()
    if how == "rank":
        return x[..., None] if tokens else x[0], {"x"}
    if how == "size" and not tokens:
        return np.concatenate([x, x[..., :1]], axis=-1), {"x"}
    if how in ("bool", "complex"):
        return x.astype(bool if how == "bool" else complex), {"x"}
    if how == "empty":
        return x[:0], {"x"}
    if how in ("id high", "id negative") and tokens:
        x[(0,) * x.ndim] = I if how == "id high" else -1
        return x, {"x"}
    if how == "id at padding" and tokens and pad.any():
        x[np.nonzero(pad)[0][0], np.nonzero(pad)[1][0]] = I   # documented: refused too
        return x, {"x"}
    return x, set()


def _draw_lengths(data, T, B):
    """(value passed, lengths as the kernels will see them or None, bad)."""
    how = data.draw(st.sampled_from(
        ["none", "none", "valid", "valid", "int32", "float ints", "readonly", "zero",
         "too long", "shape", "fraction", "nan", "bool"]), "lengths how")
    ln = np.array(data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B), "lengths"))
    if how == "none":
        return None, None, set()
    if how == "valid":
        return ln, ln, set()
    if how == "int32":
        return ln.astype(np.int32), ln, set()
    if how == "float ints":
        return ln.astype(np.float64), ln, set()
    if how == "readonly":
        return _frozen(ln), ln, set()
    if how == "zero":
        ln[0] = 0
    elif how == "too long":
        ln[-1] = T + 1
    elif how == "shape":
        ln = np.append(ln, 1)
    elif how == "fraction":
        ln = ln + 0.5
    elif how == "nan":
        ln = np.where(np.arange(B) == 0, np.nan, ln)
    else:
        ln = ln > 0
    return ln, None, {"lengths"}


def _draw_state(data, cfg, B, S, name="hx"):
    """An initial state (or a gradient of the final state), maybe bad."""
    LD = cfg["L"] * (2 if cfg["bidir"] else 1)
    H = cfg["H"]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), f"{name} seed"))
    parts = [rng.standard_normal((LD, B, H)) for _ in range(S)]
    how = data.draw(st.sampled_from(["none", "none", "valid", "readonly", "list", "nan",
                                     "shape", "complex", "not a pair"]), f"{name} how")
    lstm = S == 2

    def pack(p):
        return tuple(p) if lstm else p[0]
    if how == "none":
        return None, set()
    if how == "valid":
        return pack(parts), set()
    if how == "readonly":
        return pack([_frozen(p) for p in parts]), set()
    if how == "list":
        return pack([p.tolist() for p in parts]), set()
    if how == "nan":
        parts[0][0, 0, 0] = np.nan
        return pack(parts), set()
    if how == "shape":
        parts[-1] = parts[-1][:, :, :-1] if H > 1 else parts[-1][None]
        return pack(parts), {name}
    if how == "complex":
        parts[0] = parts[0].astype(complex)
        return pack(parts), {name}
    if lstm:
        return parts[0], {name}                 # not a pair
    return (parts[0], parts[0]), {name}         # an RNN given a pair


def _layer_cfg():
    return st.fixed_dictionaries(dict(
        mode=st.sampled_from(MODES), I=st.integers(1, 3), H=st.integers(1, 4),
        L=st.integers(1, 2), bidir=st.booleans(), bias=st.booleans(),
        batch_first=st.booleans(), dtype=st.sampled_from([np.float32, np.float64])))


def _make_core(cfg, backend):
    kw = dict(num_layers=cfg["L"], bias=cfg["bias"], batch_first=cfg["batch_first"],
              bidirectional=cfg["bidir"], dtype=cfg["dtype"], seed=0, backend=backend)
    if cfg["mode"] == "lstm":
        return fr.LSTM(cfg["I"], cfg["H"], **kw)
    return fr.RNN(cfg["I"], cfg["H"], nonlinearity=cfg["mode"], **kw)


def _copy_args(args):
    """Array arguments copied, so that one backend can never see another's
    writes (read-only ones stay read-only)."""
    def cp(v):
        if isinstance(v, np.ndarray):
            c = v.copy()
            c.flags.writeable = v.flags.writeable
            return c
        if isinstance(v, tuple):
            return tuple(cp(u) for u in v)
        return v
    return {k: cp(v) for k, v in args.items()}


def _unchanged_inputs(before, after):
    for k, v in before.items():
        if isinstance(v, (np.ndarray, tuple)):
            _bitwise(after[k], v, f"input {k} was written")


# ============================================================================
# layers: forward and backward
# ============================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(cfg=_layer_cfg(), T=st.integers(1, 5), B=st.integers(1, 3), data=st.data())
def test_layer_forward_backward(backend, cfg, T, B, data):
    S = 2 if cfg["mode"] == "lstm" else 1
    lengths, ln, bad_l = _draw_lengths(data, T, B)
    x, bad_x = _draw_x(data, cfg, T, B, ln)
    hx, bad_h = _draw_state(data, cfg, B, S)
    bad = bad_l | bad_x | bad_h
    args = dict(x=x, hx=hx, lengths=lengths)
    results = {}
    for be in ("numpy", backend):
        core = _make_core(cfg, be)
        p0 = core.state_dict()
        a = _copy_args(args)
        fwd = _outcome(lambda: core(a["x"], a["hx"], lengths=a["lengths"]))
        _unchanged_inputs(args, a)
        bwd = None
        if fwd[0] == "ok":
            out = fwd[1][0]
            rng = np.random.default_rng(T * 10 + B)
            g = rng.standard_normal(out.shape)
            bwd = _outcome(lambda: core.backward(_frozen(g)) + (core.grads,))
        _bitwise(core.state_dict(), p0, "parameters")
        results[be] = (fwd, bwd)
    (rf, rb), (gf, gb) = results["numpy"], results[backend]
    _same_outcome(rf, gf, bad, cfg["dtype"], "forward")
    if rb is not None:
        _same_outcome(rb, gb, set(), cfg["dtype"], "backward")


@pytest.mark.parametrize("backend", ALL)
@FUZZ
@given(cfg=_layer_cfg(), T=st.integers(1, 5), B=st.integers(1, 3), data=st.data())
def test_layer_backward_arguments(backend, cfg, T, B, data):
    """Bad grad_out / grad_hn are refused naming them; good ones (lists,
    read-only, NaN) give the reference's numbers."""
    S = 2 if cfg["mode"] == "lstm" else 1
    D = 2 if cfg["bidir"] else 1
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "seed"))
    x = rng.standard_normal(((B, T) if cfg["batch_first"] else (T, B)) + (cfg["I"],))
    shape = x.shape[:2] + (D * cfg["H"],)
    how = data.draw(st.sampled_from(["plain", "readonly", "list", "nan", "none", "shape",
                                     "complex"]), "grad_out how")
    g = rng.standard_normal(shape)
    bad = set()
    if how == "readonly":
        g = _frozen(g)
    elif how == "list":
        g = g.tolist()
    elif how == "nan":
        g[0, 0, 0] = np.nan
    elif how == "none":
        g = None
    elif how == "shape":
        g, bad = g[..., :-1] if g.shape[-1] > 1 else g[None], {"grad_out"}
    elif how == "complex":
        g, bad = g.astype(complex), {"grad_out"}
    ghn, bad_h = _draw_state(data, cfg, B, S, "grad_hn")
    if S == 2 and ghn is not None and not bad_h and data.draw(st.booleans(), "one None"):
        ghn = (ghn[0], None)
    bad |= bad_h
    outs = {}
    for be in ("numpy", backend):
        core = _make_core(cfg, be)
        core(x)
        outs[be] = _outcome(lambda: core.backward(g, ghn) + (core.grads,))
    _same_outcome(outs["numpy"], outs[backend], bad, cfg["dtype"], "backward")


# ============================================================================
# SequenceModel, gradient_flow and TrainStep
# ============================================================================
def _draw_optimizer(data):
    """(factory, bad names). Ranges as PyTorch's: edges, infinities and the
    refused values."""
    kind = data.draw(st.sampled_from(["sgd", "adam", "adagrad"]), "optimizer")
    good_lr = st.sampled_from([0.0, 1e-3, 0.1, 1.0, float("inf")])
    bad_lr = st.sampled_from([-1e-3, float("nan"), -float("inf"), "0.1", True])
    bad = set()

    def num(name, good, badv):
        if data.draw(st.integers(0, 9), f"{name} bad?") == 0:
            bad.add(name.split("[")[0])
            return data.draw(badv, name)
        return data.draw(good, name)
    lr = num("lr", good_lr, bad_lr)
    if kind == "sgd":
        mom = num("momentum", st.sampled_from([0.0, 0.5, 0.9, 1e30]), bad_lr)
        return (lambda: fr.SGD(lr, momentum=mom)), bad
    eps = num("eps", st.sampled_from([0.0, 1e-8, 1e-3, float("inf")]), bad_lr)
    if kind == "adagrad":
        return (lambda: fr.Adagrad(lr, eps=eps)), bad
    b1 = num("betas[0]", st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([1.0, -0.1, 2.0,
                                                                            float("nan")]))
    b2 = num("betas[1]", st.sampled_from([0.0, 0.99, 0.999]), st.sampled_from([1.0, -0.5]))
    return (lambda: fr.Adam(lr, betas=(b1, b2), eps=eps)), bad


def _draw_clip(data):
    how = data.draw(st.sampled_from(["none", "none", "norm", "value", "bad norm", "bad value",
                                     "not a clip"]), "clip")
    lim = data.draw(st.sampled_from([0.0, 1e-3, 0.1, 10.0, float("inf")]), "limit")
    badlim = data.draw(st.sampled_from([-1.0, float("nan"), "1"]), "bad limit")
    if how == "none":
        return (lambda: None), set()
    if how == "norm":
        return (lambda: fr.ClipNorm(lim)), set()
    if how == "value":
        return (lambda: fr.ClipValue(lim)), set()
    if how == "bad norm":
        return (lambda: fr.ClipNorm(badlim)), {"max_norm"}
    if how == "bad value":
        return (lambda: fr.ClipValue(badlim)), {"limit"}
    return (lambda: 1.0), {"clip"}


def _draw_targets(data, spec, T, B, ln, batch_first):
    loss, readout, O = spec
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "y seed"))
    lead = ((B, T) if batch_first else (T, B)) if readout == "all" else (B,)
    y = (rng.integers(0, O, lead) if loss == "cross_entropy"
         else rng.standard_normal(lead + (O,)))
    how = data.draw(st.sampled_from(["plain", "plain", "readonly", "list", "padding junk",
                                     "shape", "dtype", "out of range"]), "y how")
    if how == "readonly":
        return _frozen(y), set()
    if how == "list":
        return y.tolist(), set()
    if how == "padding junk":
        if readout == "all" and ln is not None and (ln < T).any():
            pad = np.arange(T)[:, None] >= ln[None]
            if batch_first:
                pad = pad.T
            y[pad] = -7 if loss == "cross_entropy" else np.nan    # ignored
        return y, set()
    if how == "shape":
        return y[..., None] if loss == "cross_entropy" else y[..., :-1], {"y"}
    if how == "dtype":
        return (y.astype(np.float64) if loss == "cross_entropy" else y.astype(complex)), {"y"}
    if loss == "cross_entropy":
        y.flat[0] = O                                     # a valid position
        return y, {"y"}
    return y, set()


def _model_state(model, step):
    sd = step.state_dict()
    return model.state_dict(), sd["opt_state"].copy(), sd["steps"]


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(cfg=_layer_cfg(), T=st.integers(1, 5), B=st.integers(1, 3),
       loss=st.sampled_from(["cross_entropy", "mse"]), readout=st.sampled_from(["all", "last"]),
       O=st.integers(1, 3), data=st.data())
def test_model_flow_and_train_step(backend, cfg, T, B, loss, readout, O, data):
    S = 2 if cfg["mode"] == "lstm" else 1
    lengths, ln, bad_l = _draw_lengths(data, T, B)
    x, bad_x = _draw_x(data, cfg, T, B, ln)
    hx, bad_h = _draw_state(data, cfg, B, S)
    y, bad_y = _draw_targets(data, (loss, readout, O), T, B, ln, cfg["batch_first"])
    make_opt, bad_o = _draw_optimizer(data)
    make_clip, bad_c = _draw_clip(data)
    sclip = data.draw(st.sampled_from([None, None, 0.5, 1e-3, -1.0, 0.0]), "state_clip")
    bad_s = {"state_clip"} if sclip is not None and sclip <= 0 else set()
    on_nf = data.draw(st.sampled_from(["skip", "raise", "ignore"]), "on_nonfinite")
    bad_n = {"on_nonfinite"} if on_nf == "ignore" else set()
    bad_in = bad_l | bad_x | bad_h | bad_y
    bad_cfg = bad_o | bad_c | bad_s | bad_n
    args = dict(x=x, y=y, hx=hx, lengths=lengths)
    res = {}
    for be in ("numpy", backend):
        model = fr.SequenceModel(_make_core(cfg, be), O, loss=loss, readout=readout)
        a = _copy_args(args)
        fwd = _outcome(lambda: model(a["x"], a["hx"], lengths=a["lengths"]))
        flow = _outcome(lambda: fr.gradient_flow(model, a["x"], a["y"], a["hx"], a["lengths"]))
        built = _outcome(lambda: fr.TrainStep(model, make_opt(), clip=make_clip(),
                                              state_clip=sclip, on_nonfinite=on_nf))
        steps = []
        if built[0] == "ok":
            step = built[1]
            for _ in range(2):
                before = _model_state(model, step)
                r = _outcome(lambda: step(a["x"], a["y"], a["hx"], a["lengths"]))
                after = _model_state(model, step)
                if r[0] == "error" or r[1].skipped:
                    _bitwise(after, before, f"{be}: state after a refused or skipped step")
                    if r[0] == "ok":
                        r = ("ok", dict(skipped=True, clipped=r[1].clipped))
                else:
                    assert after[2] == before[2] + 1
                    r = ("ok", dict(skipped=False, loss=r[1].loss, grad_norm=r[1].grad_norm,
                                    clipped=r[1].clipped, hx=r[1].hx, state=after[:2]))
                steps.append(r)
        _unchanged_inputs(args, a)
        res[be] = (fwd, flow, built, steps)
    ref, got = res["numpy"], res[backend]
    dt = cfg["dtype"]
    _same_outcome(ref[0], got[0], bad_in - {"y"}, dt, "forward")
    _same_outcome(ref[1], got[1], bad_in, dt, "gradient_flow")
    if ref[2][0] == "error" or got[2][0] == "error":
        _same_outcome(ref[2], got[2], bad_cfg, dt, "TrainStep()")
        return
    assert not bad_cfg, f"TrainStep accepted bad option(s) {sorted(bad_cfg)}"
    for i, (r, g) in enumerate(zip(ref[3], got[3])):
        _same_outcome(r, g, bad_in, dt, f"step {i}")


# ============================================================================
# constructors and options
# ============================================================================
_CTOR_BAD = {
    "input_size": [0, -1, 2.0, "3", None],
    "hidden_size": [0, 1.5, True],
    "num_layers": [0, "1"],
    "nonlinearity": ["gelu", None, 1],
    "bias": ["yes", 1, None],
    "batch_first": [0, "no"],
    "bidirectional": [1, None],
    "dtype": [np.int32, np.float16, "int8", object],
    "init": ["he", None],
    "seed": [-1, 1.5, "0"],
    "backend": ["gpu", None, 3],
}
_CTOR_GOOD = dict(input_size=[1, 3, np.int64(2)], hidden_size=[1, 4], num_layers=[1, 2],
                  nonlinearity=["tanh", "relu", "sigmoid"], bias=[True, False, np.bool_(True)],
                  batch_first=[False, True], bidirectional=[False, True],
                  dtype=[np.float32, np.float64, "float64"],
                  init=["default", "orthogonal", "xavier", "identity"],
                  seed=[None, 0, 7], backend=ALL + ["auto"])


@FUZZ
@given(data=st.data(), lstm=st.booleans(), model_kw=st.fixed_dictionaries(dict(
    output_size=st.sampled_from([1, 3, 0, -2, 1.0]),
    loss=st.sampled_from(["cross_entropy", "mse", "hinge"]),
    readout=st.sampled_from(["all", "last", "first"]))))
def test_constructors_refuse_bad_options_by_name(data, lstm, model_kw):
    kw, bad = {}, set()
    for name, good in _CTOR_GOOD.items():
        if lstm and name == "nonlinearity":
            continue
        if data.draw(st.integers(0, 7), f"{name} bad?") == 0:
            kw[name] = data.draw(st.sampled_from(_CTOR_BAD[name]), name)
            bad.add(name)
        else:
            kw[name] = data.draw(st.sampled_from(good), name)
    if lstm and kw["init"] == "identity":
        bad.add("init")
    I, H = kw.pop("input_size"), kw.pop("hidden_size")
    positional = dict(num_layers=kw.pop("num_layers"), bias=kw.pop("bias"),
                      batch_first=kw.pop("batch_first"),
                      bidirectional=kw.pop("bidirectional"))
    if not lstm:
        positional["nonlinearity"] = kw.pop("nonlinearity")
    cls = fr.LSTM if lstm else fr.RNN
    try:
        core = cls(I, H, **positional, **kw)
    except (ValueError, TypeError) as e:
        assert bad and _names_a_bad_argument(e, bad), (e, bad)
        return
    assert not bad, f"accepted bad option(s) {sorted(bad)}"
    bad_m = set()
    if not (isinstance(model_kw["output_size"], int) and model_kw["output_size"] >= 1):
        bad_m.add("output_size")
    if model_kw["loss"] == "hinge":
        bad_m.add("loss")
    if model_kw["readout"] == "first":
        bad_m.add("readout")
    try:
        fr.SequenceModel(core, model_kw["output_size"], loss=model_kw["loss"],
                         readout=model_kw["readout"])
    except (ValueError, TypeError) as e:
        assert bad_m and _names_a_bad_argument(e, bad_m), (e, bad_m)
        return
    assert not bad_m, f"accepted bad option(s) {sorted(bad_m)}"
