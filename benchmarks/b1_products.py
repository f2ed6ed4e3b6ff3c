"""B=1 LSTM: the share of a training step that the per-step products take
(forward h @ W_hh.T and backward delta @ W_hh, on fastrnn's loops), side by
side in one process, and the most that splitting W_hh's rows over 2 cores
(a per-step barrier) could gain before the barriers' own cost: if the
products are a fraction p of the step, at most 1 / (1 - p/2).

    python benchmarks/b1_products.py --hiddens 128 512
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastrnn._spec import make_spec  # noqa: E402
from fastrnn.backends import numba_cpu as nb  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hiddens", type=int, nargs="*", default=[32, 128, 512])
    ap.add_argument("--T", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    T = a.T
    print(f"# B=1 LSTM float32, T={T}, I=32, O=10, one thread, best of "
          f"{a.rounds}")
    for H in a.hiddens:
        spec = make_spec("lstm", 32, H, O=10)
        step = min(nb.time_strategy(spec, np.float32, 1, False, 0, True, T=T,
                                    reps=1) for _ in range(a.rounds))
        rng = np.random.default_rng(0)
        W = rng.standard_normal((4 * H, H)).astype(np.float32)
        WT = np.ascontiguousarray(W.T)
        h = rng.standard_normal((1, H)).astype(np.float32)
        d = rng.standard_normal((1, 4 * H)).astype(np.float32)
        g = np.zeros((1, 4 * H), np.float32)
        o = np.zeros((1, H), np.float32)
        nb._addmm_nt(h, W, g)
        nb._addmm_nt(d, WT, o)
        prod = np.inf
        for _ in range(a.rounds):
            t = time.perf_counter()
            for _ in range(T):
                nb._addmm_nt(h, W, g)
                nb._addmm_nt(d, WT, o)
            prod = min(prod, time.perf_counter() - t)
        p = prod / step
        print(f"H={H}: step {step * 1e3:.3f} ms, per-step products "
              f"{prod * 1e3:.3f} ms ({p:.0%}); 2-core split at most "
              f"{1 / (1 - p / 2):.2f}x before barrier costs", flush=True)


if __name__ == "__main__":
    main()
