"""The fused LSTM forward (MK_FUSED: gates, cell and h on each tile of the
per-step product) against the default recurrence, side by side in one
process: the numba backend's synthetic training step (forward, loss, BPTT,
update) on each strategy, alternating rounds, best time of each; prints the
ratio default / fused (> 1: fused faster). Ratios, not absolute times: the
machine may be shared.

    python benchmarks/lstm_fused.py                     # B x H grid
    python benchmarks/lstm_fused.py --shapes 64,512 16,128 --T 50
"""
import argparse
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastrnn._spec import make_spec  # noqa: E402
from fastrnn.backends import numba_cpu as nb  # noqa: E402


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=[
        f"{B},{H}" for B in (1, 16, 64) for H in (32, 128, 512)])
    ap.add_argument("--T", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--serial", action="store_true",
                    help="one thread (default: numba's threads)")
    a = ap.parse_args(argv)
    dtype = np.dtype(a.dtype)
    print(f"# {cpu_name()}, numba threads {nb.numba.get_num_threads()}, "
          f"{a.dtype}, T={a.T}, I=32, O=10, best of {a.rounds} rounds")
    print("|  B |   H | default ms | fused ms | default/fused |")
    print("|---:|----:|-----------:|---------:|--------------:|")
    for s in a.shapes:
        B, H = (int(v) for v in s.split(","))
        spec = make_spec("lstm", 32, H, O=10)
        best = {0: np.inf, nb.MK_FUSED: np.inf}
        for _ in range(a.rounds):
            for f in best:
                best[f] = min(best[f], nb.time_strategy(
                    spec, dtype, B, False, f, a.serial, T=a.T, reps=1))
        d, f = best[0] * 1e3, best[nb.MK_FUSED] * 1e3
        print(f"| {B:2d} | {H:3d} | {d:10.3f} | {f:8.3f} | {d / f:13.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
