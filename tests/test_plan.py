"""The numba backend's measured plan (backends/_plan.py): every strategy it
can choose computes the reference's training step; the plan file is keyed
by machine and versions, a foreign or corrupt one is ignored with a warning,
FASTRNN_PLAN=off touches nothing; `fastrnn tune` plans a grid."""
import json
import os

import numpy as np
import pytest

import fastrnn as fr
from _layer_oracle import make_layer
from conftest import assert_close

try:
    from fastrnn.backends import _mkl, _plan
    from fastrnn.backends import numba_cpu as nb
except Exception as e:  # numba missing: nothing of this file applies
    pytest.skip(f"numba backend not importable: {e}", allow_module_level=True)

MKL_OK = _mkl.status()[0]
STRATEGIES = [(0, False), (0, True), (nb.MK_FUSED, False), (nb.MK_FUSED, True),
              (nb.MK_TILE, False), (nb.MK_TILE, True)]
if MKL_OK:
    STRATEGIES += [(f, s) for f in (nb.MK_FWD, nb.MK_BWD, nb.MK_FWD | nb.MK_BWD,
                                    nb.MK_FUSED | nb.MK_BWD)
                   for s in (False, True)]


@pytest.fixture
def plan_dir(tmp_path, monkeypatch):
    """A fresh, empty plan directory for the test (and the plan reloaded)."""
    monkeypatch.setenv("FASTRNN_PLAN_DIR", str(tmp_path))
    monkeypatch.delenv("FASTRNN_PLAN", raising=False)
    _plan.reset()
    yield tmp_path
    _plan.reset()


@pytest.mark.parametrize("flags,serial", STRATEGIES,
                         ids=[f"mk{f}-{'serial' if s else 'par'}" for f, s in STRATEGIES])
@pytest.mark.parametrize("mode", ["tanh", "lstm", "gru"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_strategy_matches_reference(monkeypatch, flags, serial, mode, dtype):
    """Three Adam + ClipNorm steps with lengths and a carried state, 2 layers
    bidirectional, at B = 5 (chunks of 4 and 1 rows) and B = 1, on each
    strategy the plan can pick, against the NumPy reference."""
    if flags & nb.MK_MKL:
        monkeypatch.setattr(nb, "_GEMM", "mkl")
    monkeypatch.setattr(nb, "choose", lambda *a: (flags, serial))
    _matches_reference(flags, serial, mode, dtype, H=9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_lstm_with_several_tiles(monkeypatch, dtype):
    """The fused LSTM forward at H = 2 * LSTM_TILE + 6: two full tiles and
    a narrower last one. SGD: at this H, Adam's first steps (m / sqrt(v) of
    near-zero gradients) turn float32 rounding into 1e-3 relative changes
    of single weights on the default recurrence as well."""
    monkeypatch.setattr(nb, "choose", lambda *a: (nb.MK_FUSED, False))
    _matches_reference(nb.MK_FUSED, False, "lstm", dtype,
                       H=2 * nb.LSTM_TILE + 6, opt=lambda: fr.SGD(0.1))


@pytest.mark.parametrize("mode", ["tanh", "lstm", "gru"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiled_products_with_several_panels(monkeypatch, mode, dtype):
    """The register-tiled products (MK_TILE) at H = 70: W_hh's panels end
    in a partly padded one (forward and backward), the weight gradients
    are wide enough for _wgrad_tiled, and at B = 17 the chunks' last
    blocks of GEMM_MR rows are short; B = 5 and 1 as well. SGD, as in the
    fused test above."""
    assert 70 % nb.GEMM_NR
    monkeypatch.setattr(nb, "choose", lambda *a: (nb.MK_TILE, False))
    _matches_reference(nb.MK_TILE, False, mode, dtype, H=70,
                       opt=lambda: fr.SGD(0.1),
                       batches=((17, np.array([6, 2, 6, 1, 4, 6, 3, 6, 6,
                                               5, 6, 1, 6, 2, 6, 6, 4])),
                                (5, np.array([6, 2, 6, 1, 4])),
                                (1, np.array([5]))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (3, 7, 5), (4, 9, 33),
                                   (13, 40, 70), (8, 64, 64)])
def test_gemm_packed_matches_numpy(dtype, M, K, N):
    """_gemm_packed adds A @ W.T to C from W packed by _pack_panels, for
    rows and columns that are and are not multiples of the tile."""
    rng = np.random.default_rng(M * 100 + N)
    A = rng.standard_normal((M, K)).astype(dtype)
    W = rng.standard_normal((N, K)).astype(dtype)
    C = rng.standard_normal((M, N)).astype(dtype)
    want = C.astype(np.float64) + A.astype(np.float64) @ W.T.astype(np.float64)
    pk = np.full(-(-N // nb.GEMM_NR) * nb.GEMM_NR * K, np.nan, dtype=dtype)
    Wp = nb._panels(pk, N, K)
    nb._pack_panels(W, Wp)
    nb._gemm_packed(A, Wp, C)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(C, want, rtol=tol, atol=tol * K)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("R,M,N", [(300, 70, 65), (5, 64, 96)])
def test_wgrad_tiled_matches_numpy(dtype, R, M, N):
    """_wgrad_tiled (the weight gradients under MK_TILE) computes A.T @ Bm
    over more rows than one block and fewer, with panels that end partly
    padded, and the same bits on 1, 2 and 3 cores."""
    rng = np.random.default_rng(R + M)
    A = rng.standard_normal((R, M)).astype(dtype)
    Bm = rng.standard_normal((R, N)).astype(dtype)
    scratch = np.zeros((M + max(N, 32)) * nb.WG_ROWS, dtype=dtype)
    got = []
    for nc in (1, 2, 3):
        C = np.full((M, N), np.nan, dtype=dtype)
        nb._wgrad_tiled(A, Bm, C, scratch, nc)
        got.append(C)
    want = A.astype(np.float64).T @ Bm.astype(np.float64)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got[0], want, rtol=tol, atol=tol * R)
    for C in got[1:]:
        np.testing.assert_array_equal(C, got[0])


def _matches_reference(flags, serial, mode, dtype, H,
                       opt=lambda: fr.Adam(0.02),
                       batches=((5, np.array([6, 2, 6, 1, 4])),
                                (1, np.array([5])))):
    T, I, O = 6, 3, 4
    for B, lengths in batches:
        res = {}
        for backend in ("numpy", "numba"):
            core = make_layer(mode, I, H, 2, True, dtype, backend, seed=3)
            model = fr.SequenceModel(core, O)
            step = fr.TrainStep(model, opt(), clip=fr.ClipNorm(0.5))
            rng = np.random.default_rng(B)
            hx, out = None, []
            for _ in range(3):
                x = rng.standard_normal((T, B, I))
                y = rng.integers(0, O, (T, B))
                r = step(x, y, hx=hx, lengths=lengths)
                hx = r.hx
                out.append(r)
            res[backend] = (out, model.state_dict())
            if backend == "numba":
                c = step._ctx["numba"]
                want = flags if nb._GEMM == "mkl" else (
                    flags & (nb.MK_FUSED | nb.MK_TILE))
                assert int(c.cfg[nb.C_MKL]) == want
                assert c.serial == serial
        (ra, pa), (rb, pb) = res["numpy"], res["numba"]
        for a, b in zip(ra, rb):
            assert_close(b.loss, a.loss, dtype, "loss")
            assert_close(b.grad_norm, a.grad_norm, dtype, "grad_norm")
        for k in pa:
            assert_close(pb[k], pa[k], dtype, k)


def _spec(H=8, mode="lstm"):
    from fastrnn._spec import make_spec
    return make_spec(mode, 3, H, O=2)


def test_new_shape_is_measured_once_and_saved(plan_dir, monkeypatch):
    calls = []
    real = nb.measure

    def counting(*a, **k):
        calls.append(a[:3])
        return real(*a, **k)

    monkeypatch.setattr(nb, "measure", counting)
    monkeypatch.setattr(nb, "plan_candidates", lambda: [0])
    monkeypatch.setattr(nb, "_num_threads", lambda: 2)
    spec = _spec()
    choice = nb.choose(spec, np.float32, 16, False, 10)
    assert choice[0] == 0 and isinstance(choice[1], bool)
    assert nb.choose(spec, np.float32, 16, False, 10) == choice
    assert len(calls) == 1
    files = list(plan_dir.glob("fastrnn-plan-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    key = nb.shape_class(spec, np.float32, 16, False, 10)
    assert data["entries"][key]["serial"] == {"2": choice[1]}
    assert data["key"] == _plan.machine_key(nb._plan_version())
    # a new process (the plan reloaded from disk) does not measure again
    _plan.reset()
    assert nb.choose(spec, np.float32, 16, False, 10) == choice
    assert len(calls) == 1
    # another thread count: only serial-or-not is measured, MKL choice kept
    monkeypatch.setattr(nb, "_num_threads", lambda: 4)
    nb.choose(spec, np.float32, 16, False, 10)
    assert len(calls) == 2
    data = json.loads(files[0].read_text())
    assert set(data["entries"][key]["serial"]) == {"2", "4"}


def test_plan_time_is_bounded(plan_dir):
    """Planning one shape (the kernels already compiled) stays under 1 s."""
    import time
    spec = _spec(H=64)
    nb.time_strategy(spec, np.float32, 16, False, 0, False, T=1, reps=0)
    t = time.perf_counter()
    nb.measure(spec, np.float32, 16, False, nb.plan_candidates(), 2, T=128)
    assert time.perf_counter() - t < 1.5   # budget 0.8 s + one last timing


def test_foreign_plan_is_ignored_with_warning(plan_dir):
    key = _plan.machine_key(nb._plan_version())
    plan = _plan.Plan(key)
    plan.put("x", {"mkl": 0, "serial": {"1": False}})
    other = dict(key, cpu="Some Other CPU", numba="0.1")
    with pytest.warns(RuntimeWarning, match="made for"):
        p2 = _plan.Plan(other, path=plan.path)
    assert p2.entries == {}
    p2.put("y", {"mkl": 0, "serial": {"1": True}})     # replaced, new key
    data = json.loads(open(plan.path).read())
    assert data["key"] == other and set(data["entries"]) == {"y"}
    with pytest.warns(RuntimeWarning, match="made for"):
        assert _plan.Plan(key, path=plan.path).entries == {}


def test_version_change_selects_another_file(plan_dir, monkeypatch):
    """The file name carries a digest of the key: an upgrade starts a new
    plan instead of reusing choices measured with other kernels."""
    key = _plan.machine_key(nb._plan_version())
    a = _plan.Plan(key)
    b = _plan.Plan(dict(key, fastrnn=key["fastrnn"] + ".post1"))
    assert a.path != b.path


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]",
                                     '{"key": 1, "entries": 5}'])
def test_corrupt_plan_is_ignored_with_warning(plan_dir, content):
    key = _plan.machine_key(nb._plan_version())
    path = _plan.Plan(key).path
    with open(path, "w") as f:
        f.write(content)
    with pytest.warns(RuntimeWarning, match="plan file"):
        p = _plan.Plan(key)
    assert p.entries == {}
    p.put("z", {"mkl": 0, "serial": {"1": False}})
    assert json.loads(open(path).read())["entries"]["z"]["mkl"] == 0


def test_bad_entry_is_measured_again(plan_dir, monkeypatch):
    """An entry whose MKL flags are not a candidate here (made with MKL,
    read without) is measured again, not used."""
    monkeypatch.setattr(nb, "plan_candidates", lambda: [0])
    monkeypatch.setattr(nb, "_num_threads", lambda: 2)
    spec = _spec()
    plan = _plan.get_plan(nb._plan_version())
    plan.put(nb.shape_class(spec, np.float64, 8, False, 10),
             {"mkl": 3, "serial": {"2": True}})
    assert nb.choose(spec, np.float64, 8, False, 10)[0] == 0


def test_plan_off_uses_default_and_writes_nothing(plan_dir, monkeypatch):
    monkeypatch.setenv("FASTRNN_PLAN", "off")
    monkeypatch.setattr(nb, "_num_threads", lambda: 2)
    assert nb.choose(_spec(), np.float32, 16, False, 10) == (0, False)
    assert list(plan_dir.iterdir()) == []
    assert "FASTRNN_PLAN=off" in nb.plan_where()


def test_available_says_where_the_plan_lives(plan_dir):
    ok, why = nb.available()
    assert ok and "plan: " + str(plan_dir) in why


def test_tune_cli_prints_the_choices(plan_dir, capsys):
    from fastrnn.cli import main
    assert main(["tune", "--cells", "rnn", "--batches", "1,4",
                 "--hiddens", "8"]) == 0
    out = capsys.readouterr().out
    assert str(plan_dir) in out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("rnn")]
    assert [(r[1], r[2]) for r in rows] == [("1", "8"), ("4", "8")]
    assert list(plan_dir.glob("fastrnn-plan-*.json"))
    with pytest.raises(SystemExit):
        main(["tune", "--batches", "0"])


def test_tune_cli_with_plan_off(monkeypatch, capsys):
    monkeypatch.setenv("FASTRNN_PLAN", "off")
    from fastrnn.cli import main
    assert main(["tune", "--cells", "rnn", "--batches", "1", "--hiddens", "8"]) == 0
    assert "FASTRNN_PLAN is off" in capsys.readouterr().out
