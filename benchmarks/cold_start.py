"""Cold start: a new Python process imports fastrnn and runs its first
training step (the time a short script waits before any work is done).

Cases (default B=16, H=128, T=100, I=32, O=10, float32, SGD):
  c            backend="c" (the C extension, compiled at install time)
  numba-empty  backend="numba", NUMBA_CACHE_DIR a fresh empty directory:
               every kernel is JIT-compiled in the process
  numba-warm   backend="numba", NUMBA_CACHE_DIR filled by a previous run:
               kernels are loaded from numba's on-disk cache

Each case runs --repeats times, each in its own process; the table shows
the median (and min) of: the import of fastrnn, building the model, the
first step, their sum inside the process, and the wall time of the whole
process seen from outside (interpreter start-up and exit included).

    python benchmarks/cold_start.py                 # markdown table on stdout
    python benchmarks/cold_start.py --repeats 5 --cases c,numba-warm
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import fastrnn as fr
t1 = time.perf_counter()
B, H, T, I, O, backend = {B}, {H}, {T}, {I}, {O}, {backend!r}
core = fr.LSTM(I, H, backend=backend, seed=0) if {cell!r} == "lstm" else \
    fr.RNN(I, H, backend=backend, seed=0)
step = fr.TrainStep(fr.SequenceModel(core, O), fr.SGD(0.01))
rng = np.random.default_rng(0)
x = rng.standard_normal((T, B, I)).astype(np.float32)
y = rng.integers(0, O, (T, B))
t2 = time.perf_counter()
res = step(x, y)
t3 = time.perf_counter()
assert np.isfinite(res.loss) and not res.skipped
print(json.dumps(dict(imp=t1 - t0, build=t2 - t1, step=t3 - t2, total=t3 - t0,
                      backend=core.backend)))
"""

CASES = ("c", "numba-empty", "numba-warm")


def run_child(code, env):
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["wall"] = wall
    return r


def measure(case, args, code):
    env = dict(os.environ)
    backend = "c" if case == "c" else "numba"
    runs = []
    warm_dir = None
    if case == "numba-warm":
        warm_dir = tempfile.mkdtemp(prefix="fastrnn-numba-warm-")
        env["NUMBA_CACHE_DIR"] = warm_dir
        run_child(code, env)   # fills the cache
    try:
        for _ in range(args.repeats):
            if case == "numba-empty":
                d = tempfile.mkdtemp(prefix="fastrnn-numba-empty-")
                env["NUMBA_CACHE_DIR"] = d
                try:
                    runs.append(run_child(code, env))
                finally:
                    shutil.rmtree(d, ignore_errors=True)
            else:
                runs.append(run_child(code, env))
    finally:
        if warm_dir:
            shutil.rmtree(warm_dir, ignore_errors=True)
    for r in runs:
        if r["backend"] != backend:
            raise RuntimeError(f"{case}: ran on backend {r['backend']!r}")
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cell", default="rnn", choices=("rnn", "lstm"))
    p.add_argument("-B", type=int, default=16)
    p.add_argument("-H", type=int, default=128)
    p.add_argument("-T", type=int, default=100)
    p.add_argument("--json", help="also write the raw runs to this file")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; expected some of {CASES}")

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastrnn as fr
    avail = fr.available_backends()

    print(f"Cold start: new process, import fastrnn + first training step; "
          f"{args.cell}, B={args.B}, H={args.H}, T={args.T}, I=32, O=10, "
          f"float32; {args.repeats} runs each, median (min), seconds\n")
    print("| case | import | build model | first step | in process | process wall |")
    print("|---|---|---|---|---|---|")
    raw = {}
    for case in cases:
        backend = "c" if case == "c" else "numba"
        if not avail[backend][0]:
            print(f"| {case} | unavailable: {avail[backend][1]} | | | | |")
            continue
        code = CHILD.format(B=args.B, H=args.H, T=args.T, I=32, O=10,
                            backend=backend, cell=args.cell)
        runs = measure(case, args, code)
        raw[case] = runs

        def cell(key):
            v = [r[key] for r in runs]
            return f"{statistics.median(v):.3f} ({min(v):.3f})"
        print(f"| {case} | {cell('imp')} | {cell('build')} | {cell('step')} | "
              f"{cell('total')} | {cell('wall')} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
