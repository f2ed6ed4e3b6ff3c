"""Subnormal floats: one training step whose hidden states are subnormal
float32 numbers (inputs scaled by 1e-40, zero biases: every state and most
products fall below 1.18e-38) against the same step on normal numbers, side
by side in one process (ratios, not absolute times).

    python benchmarks/subnormal.py                      # default shapes
    python benchmarks/subnormal.py --shapes rnn,16,512 lstm,16,128

Prints one line per shape: the best time of each case over --rounds
alternating rounds, the fraction of subnormal hidden states, and the ratio
subnormal / normal (oneDNN issue 561 measured 18-27x on its LSTM; the
target here is <= 1.5x)."""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastrnn as fr  # noqa: E402

TINY = np.float32(1.1754944e-38)


def make(cell, B, H, subnormal, backend):
    Cell = fr.LSTM if cell == "lstm" else fr.RNN
    model = fr.SequenceModel(Cell(32, H, seed=0, backend=backend), 10)
    sd = model.state_dict()
    for k in sd:
        if k.startswith("bias"):
            sd[k] = np.zeros_like(sd[k])
    model.load_state_dict(sd)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, B, 32)).astype(np.float32)
    if subnormal:
        x *= np.float32(1e-40)
    y = rng.integers(0, 10, (100, B))
    h = model.core(x)[0]
    frac = float(np.mean((np.abs(h) < TINY) & (h != 0)))
    return fr.TrainStep(model, fr.SGD(1e-30)), x, y, frac


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=["rnn,1,128", "lstm,1,128",
                                                     "rnn,16,512", "lstm,16,128"])
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    for shape in args.shapes:
        cell, B, H = shape.split(",")
        cases = {name: make(cell, int(B), int(H), name == "subnormal", args.backend)
                 for name in ("normal", "subnormal")}
        best = {name: float("inf") for name in cases}
        for name, (step, x, y, _) in cases.items():
            step(x, y)
        for _ in range(args.rounds):
            for name, (step, x, y, _) in cases.items():
                t = time.perf_counter()
                step(x, y)
                best[name] = min(best[name], time.perf_counter() - t)
        print(f"{cell} B={B} H={H}: normal {best['normal'] * 1e3:.2f} ms, "
              f"subnormal {best['subnormal'] * 1e3:.2f} ms "
              f"({cases['subnormal'][3]:.0%} of states subnormal), "
              f"ratio {best['subnormal'] / best['normal']:.2f}", flush=True)


if __name__ == "__main__":
    main()
