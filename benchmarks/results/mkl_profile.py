"""Where the time of an LSTM training step goes on the numba backend, with
and without MKL (benchmarks/results/mkl_profile.txt), and PyTorch's split.

    python benchmarks/results/mkl_profile.py [B x H ...]   # default 16x128 16x512 64x128 64x512

Pieces, each timed alone on the real shapes (best of a few rounds, the
variants interleaved so that other load on the machine hits them alike):
  step-gemm fwd/bwd: the T per-step products of the two batch chunks (one
      per core, as the kernels split them) with the engine's choice for
      this shape (loops or MKL);
  dWhh, dWih, proj: the one-off products (OpenBLAS, split over the cores);
  rest = total - those: activations, cell update and BPTT pointwise work,
      read-out, loss, clipping/update, and the cache misses the pieces do
      not see when timed alone.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

import fastrnn as fr  # noqa: E402
from fastrnn.backends import numba_cpu as nb  # noqa: E402

T, I, O = 100, 32, 10


@njit(parallel=True)
def gemm_fwd_only(mk, pack, W, HX, G, nc):
    B = HX.shape[1]
    for c in prange(nc):
        r0 = c * B // nc
        r1 = (c + 1) * B // nc
        n = r1 - r0
        pbuf = nb._pack_slot(pack, mk, c)
        prev = nb._mkl_enter(mk)
        tmp = np.empty(n * W.shape[0], dtype=HX.dtype)
        nb._mkl_pack_w(mk, W, n, True, pbuf)
        for t in range(HX.shape[0] - 2):
            nb._step_nt(mk, HX[t, r0:r1], W, G[t, r0:r1], tmp, 1 << 62, pbuf)
        nb._mkl_exit(mk, prev)


@njit(parallel=True)
def gemm_bwd_only(mk, pack, W, D, nc):
    B = D.shape[1]
    for c in prange(nc):
        r0 = c * B // nc
        r1 = (c + 1) * B // nc
        n = r1 - r0
        pbuf = nb._pack_slot(pack, mk, c)
        prev = nb._mkl_enter(mk)
        out = np.empty((n, W.shape[1]), dtype=D.dtype)
        nb._mkl_pack_w(mk, W, n, False, pbuf)
        for t in range(D.shape[0]):
            nb._step_nn(mk, D[t, r0:r1], W, out, 1 << 62, pbuf)
        nb._mkl_exit(mk, prev)


def aligned(shape, rng, scale=1.0):
    """Random float32 array on a 64-byte boundary, as the workspace is (the
    loops' speed depends on it)."""
    a = nb._aligned_zeros(int(np.prod(shape)), np.float32, 64).reshape(shape)
    a[:] = rng.standard_normal(shape) * scale
    return a


def best(f, n=3, budget=0.7):
    f()
    b = 1e9
    t_end = time.perf_counter() + budget
    k = 0
    while k < n or time.perf_counter() < t_end:
        t = time.perf_counter()
        f()
        b = min(b, time.perf_counter() - t)
        k += 1
    return b * 1e3


def pieces(B, H, engine):
    nb.set_gemm(engine)
    rng = np.random.default_rng(0)
    model = fr.SequenceModel(fr.LSTM(I, H, seed=0), O)
    st = fr.TrainStep(model, fr.SGD(0.01))
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    y = rng.integers(0, O, (T, B))
    r = {"total": best(lambda: st(x, y)), "forward": best(lambda: model(x))}
    c = st._ctx["numba"]
    cfg = c.cfg
    mk = cfg[nb.C_MKL:nb.C_MKL + 6].copy()
    nc, ncg, par = int(cfg[nb.C_NC]), int(cfg[nb.C_NCG]), int(cfg[nb.C_PAR])
    sz = nb._sections_of(cfg)
    pack = nb._section(c.ws, sz, 17)
    part = nb._section(c.ws, sz, 9)
    W = aligned((4 * H, H), rng, 0.05)
    HX = aligned((T + 2, B, H), rng)
    G = aligned((T, B, 4 * H), rng)
    D = aligned((T, B, 4 * H), rng)
    Dl = D.reshape(T * B, 4 * H)
    xr = x.reshape(T * B, I)
    Wi = rng.standard_normal((4 * H, I)).astype(np.float32)
    gW = np.zeros((4 * H, H), np.float32)
    gWi = np.zeros((4 * H, I), np.float32)
    with nb._BLAS(nc > 1):
        r["gemm fwd"] = best(lambda: gemm_fwd_only(mk, pack, W, HX, G, nc))
        r["gemm bwd"] = best(lambda: gemm_bwd_only(mk, pack, W, D, nc))
        r["dWhh"] = best(lambda: nb._pmm_tn(Dl, HX[:T].reshape(T * B, H), gW,
                                            part, ncg, par))
        r["dWih"] = best(lambda: nb._pmm_tn(Dl, xr, gWi, part, ncg, par))
        r["proj"] = best(lambda: nb._pmm(xr, Wi.T, Dl, ncg, par))
    r["paths"] = int(mk[0])
    return r


def torch_split(B, H):
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    from fastrnn._torch_ref import TorchTrainStep
    step = TorchTrainStep("lstm", I, H, O, optimizer="sgd", lr=0.01)
    xt, yt = torch.randn(T, B, I), torch.randint(0, O, (T * B,))

    def call():
        step(xt, yt)
    total = best(call)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            call()
    ev = {e.key: e.self_cpu_time_total / 3e3 for e in prof.key_averages()}
    return total, ev.get("aten::mkldnn_rnn_layer"), ev.get("aten::mkldnn_rnn_layer_backward")


def main():
    grid = [tuple(int(v) for v in a.split("x")) for a in sys.argv[1:]] or \
        [(16, 128), (16, 512), (64, 128), (64, 512)]
    keys = ("total", "forward", "gemm fwd", "gemm bwd", "dWhh", "dWih", "proj")
    print(f"LSTM training step, T={T}, I={I}, O={O}, float32, SGD; ms, best of "
          f"3 interleaved rounds; paths: MKL flags (1 fwd, 2 bwd)")
    for B, H in grid:
        res = {}
        for _ in range(3):
            for eng in ("default", "mkl"):
                r = pieces(B, H, eng)
                old = res.get(eng)
                res[eng] = r if old is None else {
                    k: min(v, old[k]) if k != "paths" else v for k, v in r.items()}
        for eng, r in res.items():
            rest = r["total"] - sum(r[k] for k in keys[2:])
            print(f"B={B:3d} H={H:4d} {eng:7s} paths={r['paths']} "
                  + " ".join(f"{k} {r[k]:7.2f}" for k in keys) + f" | rest {rest:6.2f}")
        tr = torch_split(B, H)
        if tr:
            print(f"B={B:3d} H={H:4d} torch   total {tr[0]:7.2f} (profiler, self CPU "
                  f"ms per step: oneDNN LSTM layer forward {tr[1]:.2f}, backward "
                  f"{tr[2]:.2f})")


if __name__ == "__main__":
    main()
