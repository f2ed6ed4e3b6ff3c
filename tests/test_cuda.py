"""CUDA-specific checks of the "cuda" backend (the rest of the suite runs on
it through the ``backend``/``fast_backend`` fixtures).

Without a GPU these run under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, .ci/cuda_sim.sh), where the launch shapes are
tiny so that the small inputs here span several blocks. The default shapes of
the rest of the suite are small enough to take the "persistent" path with
W_hh in shared memory; this file forces the other two recurrence paths
(persistent with W_hh in global memory, one launch per step) and checks them
against the NumPy reference, feeds device arrays, and checks the path choice
and the host/device parameter mirroring.
"""
import contextlib

import numpy as np
import pytest

import fastrnn as fr
from conftest import assert_close, short_reason
from fastrnn._spec import make_spec, n_params

OK, WHY = fr.available_backends()["cuda"]
needs_cuda = pytest.mark.skipif(not OK, reason=f"backend 'cuda' unavailable: {short_reason(WHY)}")


def test_availability_is_explained():
    ok, why = fr.available_backends()["cuda"]
    assert isinstance(ok, bool) and why
    if not ok:
        assert ("numba-cuda is not installed" in why or "no CUDA GPU found" in why
                or "Error" in why), why
        with pytest.raises(RuntimeError, match="cuda"):
            fr.RNN(2, 3, backend="cuda")


def test_missing_numba_cuda_is_explained(monkeypatch):
    monkeypatch.setattr(cb, "_HAVE_NUMBA_CUDA", False)
    assert cb.available() == (
        False, "numba-cuda is not installed (pip install fastrnn[cuda])")


from fastrnn.backends import cuda as cb          # noqa: E402 (imports without numba-cuda)
from fastrnn.backends import reference as ref   # noqa: E402

from _layer_oracle import (compare_layer, flat_state as _flat,  # noqa: E402
                           make_layer as _layer, train_run)


@contextlib.contextmanager
def _config(**kw):
    old = cb.configure(**kw)
    try:
        yield
    finally:
        cb.configure(**old)


# the three recurrence paths: (PATH, PERSIST_SMEM_BYTES)
PATHS = {"persistent-smem": dict(PATH="persistent"),
         "persistent-global": dict(PATH="persistent", PERSIST_SMEM_BYTES=0),
         "step": dict(PATH="step")}


def _compare_layer(mode, path, dtype=np.float64, tokens=False, **kw):
    with _config(**PATHS[path]):
        compare_layer("cuda", mode, dtype, tokens, state_clip=0.7, **kw)


@needs_cuda
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mode", ["tanh", "relu", "sigmoid", "lstm", "gru"])
def test_layer_paths_match_reference(path, mode):
    _compare_layer(mode, path)


@needs_cuda
@pytest.mark.parametrize("path", ["persistent-global", "step"])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_layer_paths_float32_tokens_no_bias(path, mode):
    _compare_layer(mode, path, dtype=np.float32, tokens=True, bias=False, seed=1)
    if mode == "lstm":
        _compare_layer("tanh", path, dtype=np.float32, L=1, bidir=False, B=5, H=7, seed=2)


def _train(backend, mode, path, readout, loss, tokens, steps=2, seed=0):
    T, B, I, H, O = 4, 3, 3, 5, 3
    core = _layer(mode, I, H, 2, True, np.float64, backend, seed)
    model = fr.SequenceModel(core, O, loss=loss, readout=readout)
    step = fr.TrainStep(model, fr.Adam(0.05), clip=fr.ClipNorm(0.5), state_clip=0.3)
    with _config(**PATHS[path]):
        res, flow, z = train_run(model, step, np.random.default_rng(seed), T=T, B=B,
                                 lengths=np.array([4, 1, 3]), tokens=tokens, steps=steps)
    return res, model.state_dict(), flow, z, step.opt_state


@needs_cuda
@pytest.mark.parametrize("path,mode,readout,loss,tokens", [
    ("persistent-global", "lstm", "all", "cross_entropy", False),
    ("persistent-global", "relu", "last", "mse", True),
    ("step", "lstm", "last", "cross_entropy", True),
    ("step", "sigmoid", "all", "mse", False),
    ("persistent-smem", "gru", "all", "cross_entropy", True),
    ("step", "gru", "last", "mse", False),
])
def test_train_step_paths_match_reference(path, mode, readout, loss, tokens):
    ra, pa, fa, za, oa = _train("numpy", mode, path, readout, loss, tokens)
    rb, pb, fb, zb, ob = _train("cuda", mode, path, readout, loss, tokens)
    for a, b in zip(ra, rb):
        assert_close(b.loss, a.loss, np.float64, "loss")
        assert_close(b.grad_norm, a.grad_norm, np.float64, "grad_norm")
        assert (a.clipped, a.skipped) == (b.clipped, b.skipped)
        assert_close(_flat(b.hx), _flat(a.hx), np.float64, "hx")
    for k in pa:
        assert_close(pb[k], pa[k], np.float64, k)
    assert_close(ob, oa, np.float64, "optimizer moments (host copy)")
    assert_close(fb, fa, np.float64, "gradient_flow")
    assert_close(zb, za, np.float64, "model outputs")


@needs_cuda
@pytest.mark.skipif(not cb.SIM, reason="launch shapes are compiled in on a GPU")
def test_other_launch_shapes():
    """Smaller tiles than the simulator's defaults (one output per thread,
    blocks of 1-2 threads, a unit tile not dividing H, single-row tiles)."""
    with _config(TPB=2, MAX_BLOCKS=3, NRED=3, MM_BM=2, MM_BN=3, MM_BK=2, MM_TM=1,
                 MM_TN=1, STEP_NU=3, STEP_RB=1, STEP_KT=3, PERSIST_NT=2):
        for path in PATHS:
            _compare_layer("lstm", path, T=3, L=1, H=4, I=2, seed=3)
        ra, pa, *_ = _train("numpy", "tanh", "step", "all", "cross_entropy", False, 1)
        rb, pb, *_ = _train("cuda", "tanh", "step", "all", "cross_entropy", False, 1)
    assert_close(rb[0].loss, ra[0].loss, np.float64, "loss")
    for k in pa:
        assert_close(pb[k], pa[k], np.float64, k)


@needs_cuda
def test_path_choice_matches_the_documented_limits():
    def path(mode, H, B, dtype):
        spec = make_spec(mode, 8, H, 1, 1, True)
        return cb.choose_path(spec, B, dtype)

    with _config(PATH="auto"):
        # W_hh (+ state) in 48 KiB of shared memory
        assert path("tanh", 108, 64, np.float32) == ("persistent", True)
        assert path("tanh", 109, 4, np.float32) == ("persistent", False)
        assert path("lstm", 54, 64, np.float32) == ("persistent", True)
        assert path("lstm", 55, 4, np.float32) == ("persistent", False)
        assert path("tanh", 75, 1, np.float64) == ("persistent", True)
        assert path("lstm", 37, 1, np.float64) == ("persistent", True)
        assert path("lstm", 38, 1, np.float64) == ("persistent", False)
        # W_hh from global memory while it is at most 2 MiB and B <= 16
        assert path("tanh", 724, 16, np.float32) == ("persistent", False)
        assert path("tanh", 725, 16, np.float32)[0] == "step"
        assert path("lstm", 362, 8, np.float32) == ("persistent", False)
        assert path("lstm", 363, 8, np.float32)[0] == "step"
        assert path("lstm", 256, 17, np.float32)[0] == "step"
    with _config(PATH="step"):
        assert path("tanh", 4, 1, np.float32)[0] == "step"
    with pytest.raises(ValueError, match="PATH"):
        cb.configure(PATH="grid")


def _backend_args(mode, tokens, readout="all", loss="cross_entropy", seed=0):
    T, B, I, H, O = 4, 3, 3, 4, 3
    spec = make_spec(mode, I, H, 1, 2, True, O=O, loss=loss, readout=readout)
    rng = np.random.default_rng(seed)
    flat = rng.uniform(-0.5, 0.5, n_params(spec))
    x = rng.integers(0, I, (T, B)) if tokens else rng.standard_normal((T, B, I))
    lengths = np.array([4, 2, 3], dtype=np.int64)
    state0 = rng.standard_normal((spec.S, 2, B, H)) * 0.3
    R = (T, B) if readout == "all" else (B,)
    y = rng.integers(0, O, R) if loss == "cross_entropy" else rng.standard_normal(R + (O,))
    return spec, flat, x, lengths, state0, y


@needs_cuda
@pytest.mark.parametrize("mode,tokens", [("tanh", False), ("lstm", True)])
def test_device_array_inputs(mode, tokens):
    """x, lengths, hx and targets may already live on the device; the
    results are those of the same call with NumPy inputs (and the
    reference's)."""
    from numba import cuda

    spec, flat, x, lengths, state0, y = _backend_args(mode, tokens)
    dev = [cuda.to_device(np.ascontiguousarray(a)) for a in (x, lengths, state0, y)]
    out_h, st_h, _ = cb.core_forward(spec, flat, x, lengths, state0, ctx={})
    out_d, st_d, _ = cb.core_forward(spec, flat, *dev[:3], ctx={})
    out_r, st_r, _ = ref.core_forward(spec, flat, x, lengths, state0)
    for got in (out_h, out_d):
        assert_close(got, out_r, np.float64, "out")
    assert_close(st_d, st_r, np.float64, "state_n")
    z_d, _ = cb.model_forward(spec, flat, *dev[:3], ctx={})
    z_r, _ = ref.model_forward(spec, flat, x, lengths, state0)
    assert_close(z_d, z_r, np.float64, "read-out")
    kw = dict(opt="sgd", hyper=dict(lr=0.1, momentum=0.0), clip=None, limit=None,
              state_clip=None)
    fa, fb = flat.copy(), flat.copy()
    ra = ref.train_step(spec, fa, np.zeros((2, flat.size)), 1, x, lengths, state0, y, **kw)
    rb = cb.train_step(spec, fb, np.zeros((2, flat.size)), 1, *dev, ctx={}, **kw)
    assert_close(rb["loss"], ra["loss"], np.float64, "loss")
    assert_close(rb["grad"].copy_to_host(), ra["grad"], np.float64, "grad (device array)")
    from fastrnn import _mirror
    _mirror.sync(fb)   # the updated parameters stay on the device until asked for
    assert_close(fb, fa, np.float64, "updated parameters (host copy)")
    assert_close(cb.gradient_flow(spec, flat, *dev, ctx={}),
                 ref.gradient_flow(spec, flat, x, lengths, state0, y), np.float64, "flow")


@needs_cuda
def test_bad_device_inputs_raise_before_any_kernel_reads_them():
    from numba import cuda

    spec, flat, x, lengths, state0, y = _backend_args("tanh", True)
    bad_x = x.copy()
    bad_x[1, 2] = spec.I
    with pytest.raises(ValueError, match="token ids"):
        cb.core_forward(spec, flat, cuda.to_device(bad_x), lengths, state0)
    with pytest.raises(ValueError, match="lengths"):
        cb.core_forward(spec, flat, x, cuda.to_device(np.array([4, 0, 5])), state0)
    bad_y = y.copy()
    bad_y[0, 0] = -1
    kw = dict(opt="sgd", hyper=dict(lr=0.1), clip=None, limit=None, state_clip=None)
    with pytest.raises(ValueError, match="class ids"):
        cb.train_step(spec, flat.copy(), np.zeros((2, flat.size)), 1, x, lengths,
                      state0, cuda.to_device(bad_y), **kw)
    with pytest.raises(TypeError, match="int64"):
        cb.core_forward(spec, flat, cuda.to_device(x.astype(np.int32)), lengths, state0)
    spec2, flat2, xf, *_ = _backend_args("tanh", False)
    with pytest.raises(TypeError, match="dtype"):
        cb.core_forward(spec2, flat2, cuda.to_device(xf.astype(np.float32)), lengths,
                        state0)


@needs_cuda
def test_host_parameters_always_reflect_the_device():
    """Two TrainSteps alternate on one model and the user loads a state dict
    in between: the device copies must pick up every host-side change, and
    state_dict() must show every update."""
    def run(backend):
        rng = np.random.default_rng(5)
        model = fr.SequenceModel(_layer("tanh", 3, 4, 1, False, np.float64, backend), 2)
        s1 = fr.TrainStep(model, fr.SGD(0.1, momentum=0.9))
        s2 = fr.TrainStep(model, fr.Adagrad(0.1))
        seen = []
        for i in range(3):
            x = rng.standard_normal((4, 2, 3))
            y = rng.integers(0, 2, (4, 2))
            (s1 if i % 2 == 0 else s2)(x, y)
            seen.append(model.state_dict())
            if i == 1:
                sd = model.state_dict()
                sd["weight_hh_l0"] *= 0.5
                model.load_state_dict(sd)
        return seen, s1.opt_state

    seen_a, mom_a = run("numpy")
    seen_b, mom_b = run("cuda")
    for sa, sb in zip(seen_a, seen_b):
        for k in sa:
            assert_close(sb[k], sa[k], np.float64, k)
    assert_close(mom_b, mom_a, np.float64, "momentum buffer")


# --------------------------------------------------------------------------
# kernel signatures: what the simulator launches is what a GPU compiles
# --------------------------------------------------------------------------
@needs_cuda
@pytest.mark.skipif(not cb.SIM, reason="records launches in the simulator")
def test_launches_use_the_documented_signatures(monkeypatch):
    """Every launch (both dtypes, both paths, all read-outs, token ids and
    device inputs) passes exactly the argument types of
    cb.kernel_signatures(), which is what precompile() and the GPU compile
    test below compile."""
    import numba

    seen = {}
    launch = cb._launch

    def record(kern, grid, block, args, shmem=0):
        seen.setdefault(kern, set()).add(tuple(numba.typeof(a) for a in args))
        launch(kern, grid, block, args, shmem)

    monkeypatch.setattr(cb, "_launch", record)
    for path in ("persistent-smem", "step"):
        for dtype in (np.float32, np.float64):
            _compare_layer("lstm", path, dtype=dtype, T=2, B=2, H=2, L=2, seed=4)
            _compare_layer("tanh", path, dtype=dtype, tokens=True, T=2, B=2, H=2, L=1,
                           bidir=False, seed=4)
    _train("cuda", "lstm", "step", "last", "mse", False, steps=1)
    _train("cuda", "tanh", "persistent-smem", "all", "cross_entropy", True, steps=1)
    test_device_array_inputs("tanh", True)
    expected = {dt: cb.kernel_signatures(dt) for dt in (np.float32, np.float64)}
    # the relayout kernels compile for whatever device array the user passes
    # (relayout_signatures lists the common forms, for precompile)
    for kern in (cb._relayout1_kernel, cb._relayout2_kernel, cb._relayout3_kernel):
        seen.pop(kern, None)
    assert set(seen) == set(expected[np.float32]), "a kernel was never launched"
    for kern, sigs in seen.items():
        allowed = {tuple(expected[dt][kern]) for dt in expected}
        assert sigs <= allowed, f"{kern.__name__}: launched with {sigs - allowed}"


def _ptxas():
    import glob
    import shutil
    import site
    found = shutil.which("ptxas")
    for d in [found and "", *site.getsitepackages()]:
        if found:
            return found
        hits = glob.glob(f"{d}/nvidia/cuda_nvcc/bin/ptxas")
        if hits:
            return hits[0]
    return None


@pytest.mark.skipif(cb.cuda is None, reason=f"numba-cuda unavailable: {short_reason(WHY)}")
@pytest.mark.skipif(cb.SIM, reason="compiles for a real GPU (not in the simulator)")
def test_kernels_compile_for_a_gpu(monkeypatch, tmp_path):
    """Type-check and compile every kernel to PTX for sm_90 with NVVM, even
    without a GPU (needs NVVM/NVRTC: pip install nvidia-cuda-nvcc-cu12
    nvidia-cuda-nvrtc-cu12, or a CUDA toolkit); with ptxas, also check that
    the registers fit the block sizes the backend launches."""
    import os
    import re
    import subprocess

    from numba import cuda
    from numba import types as nt

    def probe(a):
        a[0] = 1.0

    try:
        cuda.compile_ptx(probe, (nt.float32[::1],), cc=(9, 0))
    except Exception as e:
        why = f"cannot compile PTX here (NVVM/NVRTC missing?): {type(e).__name__}: {e}"
        if os.environ.get("FASTRNN_REQUIRE_PTX"):   # .ci/cuda_sim.sh installed them
            pytest.fail(why)
        pytest.skip(why)
    if not cuda.is_available():   # device functions ask for the device's cc
        import numba.cuda.dispatcher as disp

        class _Sm90:
            compute_capability = (9, 0)
        monkeypatch.setattr(disp, "get_current_device", lambda: _Sm90())
    block = {cb._mm_kernel: (cb._GPU_SHAPES["MM_BM"] // cb._GPU_SHAPES["MM_TM"])
             * (cb._GPU_SHAPES["MM_BN"] // cb._GPU_SHAPES["MM_TN"]),
             cb._fwd_persistent_kernel: cb._persist_threads(10 ** 6),
             cb._bwd_persistent_kernel: cb._persist_threads(10 ** 6),
             cb._fwd_step_kernel: cb._GPU_SHAPES["STEP_NU"],
             cb._bwd_step_kernel: cb._GPU_SHAPES["STEP_NU"]}
    ptxas = _ptxas()
    for dt in (np.float32, np.float64):
        for kern, sig in (list(cb.kernel_signatures(dt).items())
                          + cb.relayout_signatures(dt)):
            ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
            if ptxas is None:
                continue
            src = tmp_path / "k.ptx"
            src.write_text(ptx)
            info = subprocess.run([ptxas, "-arch=sm_90", "-v", str(src), "-o",
                                   str(tmp_path / "k.cubin")], capture_output=True,
                                  text=True, check=True).stderr
            regs = int(re.search(r"Used (\d+) registers", info).group(1))
            threads = block.get(kern, cb._GPU_SHAPES["TPB"])
            assert regs * threads <= 65536, (
                f"{kern.__name__} ({np.dtype(dt).name}): {regs} registers x "
                f"{threads} threads exceed the 64K registers of a block")
            assert "spill" not in info or " 0 bytes spill stores" in info


# --------------------------------------------------------------------------
# parameters and moments stay on the device between steps
# --------------------------------------------------------------------------
def _resident_setup(backend, seed=3):
    core = _layer("lstm", 3, 4, 1, False, np.float64, backend, seed)
    model = fr.SequenceModel(core, 2)
    step = fr.TrainStep(model, fr.Adam(0.05), clip=fr.ClipNorm(0.5))
    rng = np.random.default_rng(seed)
    data = [(rng.standard_normal((4, 2, 3)), rng.integers(0, 2, (4, 2)))
            for _ in range(4)]
    return model, step, data


@needs_cuda
def test_parameters_stay_on_the_device_until_the_host_asks():
    """Steps with nobody looking leave the host buffers untouched (nothing was
    copied back); the first host access (state_dict, opt_state, forward,
    save) brings back exactly the reference's numbers."""
    ma, sa, data = _resident_setup("numpy")
    mb, sb, _ = _resident_setup("cuda")
    before = mb._buf.copy()
    for x, y in data[:2]:
        ra, rb = sa(x, y), sb(x, y)
        assert_close(rb.loss, ra.loss, np.float64, "loss")
    np.testing.assert_array_equal(mb._buf, before)       # still on the device
    np.testing.assert_array_equal(sb._opt, 0)
    for k, v in ma.state_dict().items():                  # the host asks
        assert_close(mb.state_dict()[k], v, np.float64, k)
    assert_close(sb.opt_state, sa.opt_state, np.float64, "moments")
    for x, y in data[2:]:                                 # and the step goes on
        sa(x, y), sb(x, y)
    za, _ = ma(data[0][0])
    zb, _ = mb(data[0][0])                               # forward sees the newest
    assert_close(zb, za, np.float64, "forward after resident steps")
    ha, _ = ma.core(data[0][0])
    hb, _ = mb.core(data[0][0])
    assert_close(hb, ha, np.float64, "the core's own forward")


@needs_cuda
def test_no_update_is_lost_when_the_train_step_goes_away(tmp_path):
    ma, sa, data = _resident_setup("numpy")
    mb, sb, _ = _resident_setup("cuda")
    for x, y in data:
        sa(x, y), sb(x, y)
    fr.save(tmp_path / "ck.npz", mb, train_step=sb)
    del sb
    import gc
    gc.collect()
    for k, v in ma.state_dict().items():
        assert_close(mb.state_dict()[k], v, np.float64, k)
    ck = fr.load(tmp_path / "ck.npz")
    for k, v in ma.state_dict().items():
        assert_close(ck.model.state_dict()[k], v, np.float64, f"saved {k}")
    assert_close(ck.train_step.opt_state, sa.opt_state, np.float64, "saved moments")


@needs_cuda
def test_a_model_with_parameters_on_the_device_can_be_garbage_collected():
    import gc
    import weakref

    from fastrnn import _mirror
    model, step, data = _resident_setup("cuda")
    step(*data[0])
    buf, ctx = weakref.ref(model._buf), weakref.ref(step._ctx["cuda"])
    assert _mirror.entry(model._buf).holder is step._ctx["cuda"]
    n = len(_mirror._entries)
    del model, step
    gc.collect()
    assert buf() is None and ctx() is None and len(_mirror._entries) < n


@needs_cuda
def test_views_from_parameters_see_every_step_and_are_seen():
    """While views from parameters() are alive the host must stay current
    (they can be read at any time) and writes through them must reach the
    next step; once they are gone the device copy is the master again."""
    ma, sa, data = _resident_setup("numpy")
    mb, sb, _ = _resident_setup("cuda")
    pa, pb = ma.parameters(), mb.parameters()
    w_hh = pb["weight_hh_l0"][1:3]            # a view derived from a view
    del pb
    for i, (x, y) in enumerate(data[:3]):
        sa(x, y), sb(x, y)
        assert_close(w_hh, pa["weight_hh_l0"][1:3], np.float64, f"view after step {i}")
        w_hh *= 0.5                            # a write the next step must use
        pa["weight_hh_l0"][1:3] *= 0.5
    del w_hh                                   # no views left: resident again
    before = mb._buf.copy()
    sa(*data[3]), sb(*data[3])
    np.testing.assert_array_equal(mb._buf, before)
    for k, v in ma.state_dict().items():
        assert_close(mb.state_dict()[k], v, np.float64, k)


@needs_cuda
def test_load_state_dict_and_opt_state_writes_reach_the_device():
    ma, sa, data = _resident_setup("numpy")
    mb, sb, _ = _resident_setup("cuda")
    sa(*data[0]), sb(*data[0])
    sd = ma.state_dict()
    sd["weight_out"] *= -1
    ma.load_state_dict(sd)
    mb.load_state_dict(sd)
    st = sa.state_dict()
    st["opt_state"] = st["opt_state"] * 0.25
    sa.load_state_dict(st)
    sb.load_state_dict(st)
    for x, y in data[1:]:
        ra, rb = sa(x, y), sb(x, y)
        assert_close(rb.loss, ra.loss, np.float64, "loss")
        assert_close(rb.grad_norm, ra.grad_norm, np.float64, "grad norm")
    for k, v in ma.state_dict().items():
        assert_close(mb.state_dict()[k], v, np.float64, k)
    assert_close(sb.opt_state, sa.opt_state, np.float64, "moments")


@needs_cuda
@pytest.mark.parametrize("tokens,batch_first,readout,loss", [
    (False, False, "all", "cross_entropy"),
    (True, True, "all", "cross_entropy"),
    (False, True, "all", "mse"),
    (True, False, "last", "cross_entropy"),
    (False, True, "last", "mse"),
])
def test_device_arrays_through_the_public_api(tokens, batch_first, readout, loss):
    """x and y as device arrays (batch_first, another float dtype, int32 ids,
    invalid class ids at padding steps) give the reference's numbers through
    the layers, SequenceModel, TrainStep and gradient_flow."""
    from numba import cuda

    T, B, I, H, O = 4, 3, 3, 5, 2
    rng = np.random.default_rng(7)
    lengths = np.array([4, 2, 3])
    x = rng.integers(0, I, (T, B)).astype(np.int32) if tokens else \
        rng.standard_normal((T, B, I)).astype(np.float32)
    shape = (T, B) if readout == "all" else (B,)
    y = (rng.integers(0, O, shape).astype(np.int32) if loss == "cross_entropy"
         else rng.standard_normal(shape + (O,)).astype(np.float32))
    if loss == "cross_entropy" and readout == "all":
        y[3, 1] = 99    # a padding step (lengths[1] = 2): ignored, not an error
    if not tokens:      # NaN at padding steps is ignored too (read in place)
        x[np.arange(T)[:, None] >= lengths[None, :]] = np.nan
    if batch_first:
        x = np.ascontiguousarray(x.swapaxes(0, 1))
        if readout == "all":
            y = np.ascontiguousarray(y.swapaxes(0, 1))
    res = {}
    for backend in ("numpy", "cuda"):
        core = fr.LSTM(I, H, batch_first=batch_first, dtype=np.float64, seed=1,
                       backend=backend)
        model = fr.SequenceModel(core, O, loss=loss, readout=readout)
        step = fr.TrainStep(model, fr.SGD(0.1, momentum=0.5))
        h0 = np.full((1, B, H), 0.1)
        dev = cuda.to_device if backend == "cuda" else (lambda a: a)
        xi, yi, li = dev(x), dev(y), dev(lengths)
        out, _ = core(xi, hx=(dev(h0), dev(-h0)), lengths=li)
        r1 = step(xi, yi, lengths=li)
        r2 = step(xi, yi, hx=(dev(r1.hx[0]), dev(r1.hx[1])), lengths=lengths)
        flow = fr.gradient_flow(model, xi, yi, lengths=lengths)
        z, _ = model(xi, lengths=lengths)
        res[backend] = (out, r1.loss, r2.loss, r2.grad_norm, flow, z, model.state_dict())
    for name, a, b in zip(("out", "loss 1", "loss 2", "norm", "flow", "z", "params"),
                          res["numpy"], res["cuda"]):
        if isinstance(a, dict):
            for k in a:
                assert_close(b[k], a[k], np.float64, k)
        else:
            assert_close(b, a, np.float64, name)


@needs_cuda
def test_bad_device_arrays_through_the_public_api():
    from numba import cuda

    core = fr.RNN(3, 4, dtype=np.float64, backend="cuda")
    model = fr.SequenceModel(core, 2)
    step = fr.TrainStep(model, fr.SGD(0.1))
    with pytest.raises(ValueError, match=r"x: expected shape \(T, B, 3\)"):
        core(cuda.to_device(np.zeros((4, 2, 5))))
    with pytest.raises(ValueError, match="x: token ids"):
        core(cuda.to_device(np.array([[0, 3]])))
    with pytest.raises(TypeError, match="x: expected a float array or integer"):
        core(cuda.to_device(np.zeros((4, 2, 3), dtype=np.bool_)))
    x = np.zeros((4, 2, 3))
    with pytest.raises(ValueError, match="y: class ids"):
        step(cuda.to_device(x), cuda.to_device(np.full((4, 2), 2)))
    with pytest.raises(ValueError, match=r"y: expected class ids of shape"):
        step(cuda.to_device(x), cuda.to_device(np.zeros((2, 4), dtype=np.int64)))
    with pytest.raises(TypeError, match="cross_entropy expects integer"):
        step(cuda.to_device(x), cuda.to_device(np.zeros((4, 2))))
    r = step(cuda.to_device(x), cuda.to_device(np.ones((4, 2), dtype=np.int64)))
    assert np.isfinite(r.loss) and step.steps == 1


@needs_cuda
def test_host_backends_copy_device_arrays_to_the_host():
    from numba import cuda

    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 3))
    y = rng.integers(0, 2, (3, 2))
    for backend in ("numpy", "numba"):
        model = fr.SequenceModel(fr.RNN(3, 4, dtype=np.float64, seed=0,
                                        backend=backend), 2)
        step = fr.TrainStep(model, fr.SGD(0.1))
        z_host, _ = model(x)
        z_dev, _ = model(cuda.to_device(x))
        np.testing.assert_array_equal(z_dev, z_host)
        r = step(cuda.to_device(x), cuda.to_device(y), lengths=cuda.to_device(np.array([3, 1])))
        assert np.isfinite(r.loss)
