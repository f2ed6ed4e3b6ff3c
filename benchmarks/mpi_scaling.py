"""Weak scaling of data-parallel training (TrainStep(comm=)) on this machine,
and the all-reduce's share of a step.

    python benchmarks/mpi_scaling.py [--out benchmarks/results/mpi]

runs itself under `mpiexec -n 1` and `mpiexec -n 2` (NUMBA_NUM_THREADS=1:
one core per rank), each rank with its own batch of B_r rows, so 2 ranks
do twice the work of 1 in the ideal time of 1. Per point (the benchmark
grid's T=100, I=32, O=10, float32, SGD; RNN tanh and LSTM; B_r=16;
H in {32, 128, 512}) it reports the median step time of a plain TrainStep
(1 process), of TrainStep(comm=) on 1 and 2 ranks, and of the step's one
Allreduce alone (the flat gradient buffer, P+4 values) on 2 ranks. Before
timing, every rank checks that the ranks hold bitwise equal parameters
after a few steps. Writes OUT.json and OUT.md (with the paper estimate of
the all-reduce on 8 machines over 10 Gb/s Ethernet beside the step time).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

T, I, O, BR = 100, 32, 10, 16
HIDDENS = (32, 128, 512)
CELLS = ("rnn", "lstm")
SECONDS = 1.0            # timed per point and variant (after a warm-up)
NET_BYTES_S = 10e9 / 8   # 10 Gb/s
NET_LATENCY_S = 50e-6    # per message over TCP on 10 GbE (typical)
MACHINES = 8


def _median_time(fn, seconds, comm=None):
    """Median seconds of fn(); with comm the ranks run the same number of
    repetitions (rank 0's count), as every call is collective."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    reps = max(5, min(2000, int(seconds / max(one, 1e-6))))
    if comm is not None:
        reps = comm.bcast(reps, root=0)
        comm.Barrier()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def rank_main(out):
    from mpi4py import MPI

    import fastrnn as fr
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rows = []
    for cell in CELLS:
        for H in HIDDENS:
            Layer = fr.LSTM if cell == "lstm" else fr.RNN
            rng = np.random.default_rng(rank)
            x = rng.standard_normal((T, BR, I)).astype(np.float32)
            y = rng.integers(0, O, (T, BR))

            def make(c):
                m = fr.SequenceModel(Layer(I, H, seed=0), O)
                return m, fr.TrainStep(m, fr.SGD(0.01), comm=c)
            m, ts = make(comm)
            for _ in range(3):
                ts(x, y)
            p = m._params()
            every = comm.allgather(p.tobytes())
            assert all(b == every[0] for b in every), "ranks' parameters differ"
            row = dict(cell=cell, H=H, B_r=BR, ranks=size, params=int(p.size),
                       step_comm_s=_median_time(lambda: ts(x, y), SECONDS, comm))
            if size == 1:
                _, plain = make(None)
                row["step_plain_s"] = _median_time(lambda: plain(x, y), SECONDS)
            buf = np.zeros(p.size + 4, dtype=np.float32)
            row["allreduce_s"] = _median_time(
                lambda: comm.Allreduce(MPI.IN_PLACE, buf), SECONDS / 2, comm)
            rows.append(row)
    every = comm.gather(rows, root=0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(every, f)


def _cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/mpi")
    ap.add_argument("--rank-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_out:
        return rank_main(a.rank_out)
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runs = {}
    for n in (1, 2):
        tmp = f"{a.out}.rank-n{n}.json"
        subprocess.run([exe, "-n", str(n), sys.executable, __file__, "--rank-out", tmp],
                       env=env, check=True)
        with open(tmp) as f:
            runs[n] = json.load(f)      # [rank][point]
        os.remove(tmp)
    table = []
    for j, one in enumerate(runs[1][0]):
        two = [runs[2][r][j] for r in range(2)]
        step2 = max(r["step_comm_s"] for r in two)
        ar2 = max(r["allreduce_s"] for r in two)
        nbytes = 4 * one["params"]
        # ring all-reduce: each machine sends and receives 2 (N-1)/N of the
        # buffer, in 2 (N-1) messages
        paper = (2 * (MACHINES - 1) / MACHINES * nbytes / NET_BYTES_S
                 + 2 * (MACHINES - 1) * NET_LATENCY_S)
        table.append(dict(cell=one["cell"], H=one["H"], params=one["params"],
                          plain_ms=1e3 * one["step_plain_s"],
                          comm1_ms=1e3 * one["step_comm_s"], comm2_ms=1e3 * step2,
                          efficiency=one["step_comm_s"] / step2,
                          allreduce2_ms=1e3 * ar2, share2=ar2 / step2,
                          paper8_ms=1e3 * paper,
                          paper8_share=paper / (one["step_plain_s"] + paper)))
    with open(a.out + ".json", "w") as f:
        json.dump(dict(cpu=_cpu(), cores=os.cpu_count(), B_r=BR, T=T, I=I, O=O,
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       rows=table), f, indent=1)
    lines = [f"Weak scaling, {_cpu()} ({os.cpu_count()} cores), one core per rank, "
             f"float32, T={T}, I={I}, O={O}, B_r={BR} rows per rank, SGD; "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}", "",
             "| cell | H | params | plain ms | comm, 1 rank ms | comm, 2 ranks ms | "
             "efficiency | Allreduce ms (2 ranks) | share | 8 machines, 10 Gb/s: "
             "Allreduce ms | share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['cell']} | {r['H']} | {r['params']} | {r['plain_ms']:.2f} | "
                     f"{r['comm1_ms']:.2f} | {r['comm2_ms']:.2f} | {r['efficiency']:.2f} | "
                     f"{r['allreduce2_ms']:.3f} | {r['share2']:.1%} | "
                     f"{r['paper8_ms']:.2f} | {r['paper8_share']:.1%} |")
    text = "\n".join(lines) + "\n"
    with open(a.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
