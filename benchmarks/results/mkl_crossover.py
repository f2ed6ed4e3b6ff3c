"""Per-step products of the chunked recurrences: the numba backend's
register-blocked loops against MKL's cblas_sgemm and its packed API
(benchmarks/results/mkl_crossover.txt; the rules of numba_cpu.mkl_paths).

Both batch chunks run at once, one per core (prange over 2 chunks of m rows,
B = 2m), T=100 steps, float32, arrays 64-byte aligned as in the workspace.
forward: C (m, G*H) += h (m, H) W_hh^T;  backward: C (m, H) = dgates (m, G*H) W_hh.
GFLOP/s over the two cores, best of 3 rounds.

    python benchmarks/results/mkl_crossover.py [--G 4|1]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
import numpy as np  # noqa: E402

from fastrnn.backends import _mkl  # noqa: E402
from fastrnn.backends import numba_cpu as nb  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mkl_profile import gemm_bwd_only, gemm_fwd_only  # noqa: E402 (same kernels)

T = 100


def aligned(shape, rng, scale=1.0):
    a = nb._aligned_zeros(int(np.prod(shape)), np.float32, 64).reshape(shape)
    a[:] = rng.standard_normal(shape) * scale
    return a


def timeit(f, budget=0.4):
    f()
    b = 1e9
    t_end = time.perf_counter() + budget
    k = 0
    while k < 3 or time.perf_counter() < t_end:
        t = time.perf_counter()
        f()
        b = min(b, time.perf_counter() - t)
        k += 1
    return b


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--G", type=int, default=4, help="4: LSTM, 1: RNN")
    args = ap.parse_args()
    mkl = _mkl.load()
    G = args.G
    rng = np.random.default_rng(0)
    print(f"{'LSTM' if G == 4 else 'RNN'} per-step products, GFLOP/s over 2 cores "
          f"(loops / mkl sgemm / mkl packed); {mkl.describe()}")
    nb._BLAS._set(1)   # BLAS pinned to one thread, as during kernel calls
    for H in (32, 64, 128, 256, 512):
        for m in (1, 2, 4, 8, 16, 32):
            B = 2 * m
            W = aligned((G * H, H), rng, 0.05)
            HX = aligned((T + 2, B, H), rng)
            C = aligned((T, B, G * H), rng)
            D = aligned((T, B, G * H), rng)
            fl = 2 * T * B * H * G * H / 1e9
            packn = max(mkl.pack_size("f", _mkl.B_MATRIX, m, G * H, H),
                        mkl.pack_size("f", _mkl.B_MATRIX, m, H, G * H)) // 4 + 16
            pack = np.zeros(2 * packn, np.float32)
            res = {}
            for name, flags in (("loops", 0), ("mkl", 3), ("packed", 7)):
                mk = np.array([flags, mkl.gemm["f"], mkl.pack["f"], mkl.compute["f"],
                               packn if flags & 4 else 0, mkl.set_threads_local],
                              np.int64)
                bf = bb = 1e9
                for _ in range(3):
                    bf = min(bf, timeit(lambda: gemm_fwd_only(mk, pack, W, HX, C, 2)))
                    bb = min(bb, timeit(lambda: gemm_bwd_only(mk, pack, W, D, 2)))
                res[name] = (fl / bf, fl / bb)
            rule = nb.mkl_paths(m, H, G)
            print(f"H={H:4d} m={m:3d} (B={B:3d}) fwd "
                  + " / ".join(f"{v[0]:5.1f}" for v in res.values())
                  + "   bwd " + " / ".join(f"{v[1]:5.1f}" for v in res.values())
                  + f"   mkl_paths: {'fwd ' if rule & nb.MK_FWD else ''}"
                  f"{'bwd' if rule & nb.MK_BWD else ''}", flush=True)


if __name__ == "__main__":
    main()
