"""The machine's float32 GEMM peak, measured in the same run as the training
steps: NumPy's sgemm (its BLAS, default threads) on n x n matrices, n=2048.

benchmarks/report.py divides the FLOPs of a training step by its time and
by this peak (issue target: the LSTM step at B=64, H=512 at >= 60% of it).
"""
import os

import numpy as np

N = 2048


def test_sgemm_peak(benchmark):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((N, N)).astype(np.float32)
    b = rng.standard_normal((N, N)).astype(np.float32)
    c = np.empty((N, N), dtype=np.float32)
    ref = a[:64].astype(np.float64) @ b.astype(np.float64)
    np.dot(a, b, out=c)        # checked before it is timed, like every benchmark
    np.testing.assert_allclose(c[:64], ref, rtol=1e-3, atol=1e-2 * np.abs(ref).max())
    benchmark.group = "sgemm peak"
    benchmark.extra_info.update(kind="gemm_peak", n=N, dtype="float32",
                                flops=2 * N ** 3,
                                OPENBLAS_NUM_THREADS=os.environ.get(
                                    "OPENBLAS_NUM_THREADS", "unset"))
    benchmark(np.dot, a, b, out=c)
