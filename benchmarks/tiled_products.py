"""The register-tiled per-step products (MK_TILE: _gemm_packed on W_hh
packed in panels) against the default dot-product loops (_addmm_nt), side
by side in one process, alternating rounds, best time of each:

1. the per-step products alone, at one chunk's rows (chunk_rows(B)):
   forward h_{t-1} @ W_hh.T and backward delta @ W_hh, GFLOP/s of each;
2. the numba backend's synthetic training step (forward, cross-entropy over
   all steps, BPTT, SGD) on each strategy, with the GFLOP/s of its products
   (6 T B GH H + 4 T B GH I + 6 T B H O multiply-add flops);
3. numpy's sgemm at n = 2048 (the machine's fp32 GEMM peak here), before
   every shape; the best of those is the peak the last column uses.

Prints ratios old/new (> 1: tiled faster) with the CPU named: the machine
may be shared, so compare ratios, not absolute times.

    python benchmarks/tiled_products.py                 # B x H grid, RNN+LSTM
    python benchmarks/tiled_products.py --shapes 64,512 --cells lstm --T 50
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastrnn._spec import make_spec  # noqa: E402
from fastrnn.backends import numba_cpu as nb  # noqa: E402
from lstm_fused import cpu_name  # noqa: E402


def _best(fn, rounds, reps):
    best = np.inf
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def sgemm_peak(n=2048, rounds=3):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    return 2 * n ** 3 / _best(lambda: a @ a, rounds, 1) / 1e9


def products(cell, B, H, dtype, rounds):
    """(old fwd, new fwd, old bwd, new bwd) GFLOP/s of one chunk's
    per-step products, alternating old and new."""
    GH = (4 if cell == "lstm" else 1) * H
    M = nb.chunk_rows(B)
    rng = np.random.default_rng(0)
    W = (0.1 * rng.standard_normal((GH, H))).astype(dtype)
    WT = np.ascontiguousarray(W.T)
    h = rng.standard_normal((M, H)).astype(dtype)
    d = rng.standard_normal((M, GH)).astype(dtype)
    G = np.zeros((M, GH), dtype)
    dh = np.zeros((M, H), dtype)
    buf = np.zeros(nb.GEMM_NR * max(-(-GH // nb.GEMM_NR) * H,
                                    -(-H // nb.GEMM_NR) * GH), dtype)
    pf = nb._panels(buf, GH, H)
    nb._pack_panels(W, pf)
    buf2 = np.zeros_like(buf)
    pb = nb._panels(buf2, H, GH)
    nb._pack_panels(WT, pb)
    cases = [lambda: nb._addmm_nt(h, W, G), lambda: nb._gemm_packed(h, pf, G),
             lambda: nb._addmm_nt(d, WT, dh), lambda: nb._gemm_packed(d, pb, dh)]
    reps = max(1, int(2e7 // (M * GH * H)))
    best = [np.inf] * 4
    for _ in range(rounds):
        for i, f in enumerate(cases):
            best[i] = min(best[i], _best(f, 1, reps))
    return [2 * M * GH * H / t / 1e9 for t in best]


def step_flops(cell, B, H, T, I=32, O=10):
    GH = (4 if cell == "lstm" else 1) * H
    return T * B * (6 * GH * H + 4 * GH * I + 6 * H * O)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=[
        f"{B},{H}" for B in (1, 16, 64) for H in (32, 128, 512)])
    ap.add_argument("--cells", nargs="*", default=["rnn", "lstm"])
    ap.add_argument("--T", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-steps", action="store_true",
                    help="the products only")
    a = ap.parse_args(argv)
    dtype = np.dtype(a.dtype)
    peak = sgemm_peak()
    print(f"# {cpu_name()}, GEMM_NR={nb.GEMM_NR} (32: AVX-512), numba threads "
          f"{nb.numba.get_num_threads()}, {a.dtype}, T={a.T}, I=32, O=10, "
          f"best of {a.rounds} rounds; numpy sgemm n=2048: {peak:.0f} GFLOP/s")
    print("| cell | B | H | fwd old | fwd new | fwd x | bwd old | bwd new "
          "| bwd x | step old ms | step new ms | step x | step new GF/s "
          "| % sgemm so far |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for cell in a.cells:
        for s in a.shapes:
            B, H = (int(v) for v in s.split(","))
            fo, fn, bo, bn = products(cell, B, H, dtype, a.rounds)
            row = (f"| {cell} | {B} | {H} | {fo:.1f} | {fn:.1f} | {fn / fo:.2f} "
                   f"| {bo:.1f} | {bn:.1f} | {bn / bo:.2f} ")
            if not a.no_steps:
                peak = max(peak, sgemm_peak(rounds=1))
                spec = make_spec("lstm" if cell == "lstm" else "tanh", 32, H,
                                 O=10)
                best = {0: np.inf, nb.MK_TILE: np.inf}
                for _ in range(a.rounds):
                    for f in best:
                        best[f] = min(best[f], nb.time_strategy(
                            spec, dtype, B, False, f, False, T=a.T, reps=1))
                o, n = best[0], best[nb.MK_TILE]
                gf = step_flops(cell, B, H, a.T) / n / 1e9
                row += (f"| {o * 1e3:.3f} | {n * 1e3:.3f} | {o / n:.2f} "
                        f"| {gf:.1f} | {100 * gf / peak:.0f}% ")
            print(row + "|", flush=True)
            peak = max(peak, sgemm_peak(rounds=1))
    print(f"# numpy sgemm n=2048, best over the run: {peak:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
