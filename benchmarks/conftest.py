"""Shared configuration of the fastrnn benchmark suite.

Command-line options (all optional):
  --bench-backends=numba,numba-mkl,torch   which implementations to time
  --bench-cells=rnn                    which cell types to time
  --bench-slow-budget=3.0              seconds of timing for one slow point
"""
import importlib.util
import os
import sys

# `pytest benchmarks/` from a source checkout that is not pip-installed:
# make the package in the repository root importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("fastrnn") is None:
    sys.path.insert(0, _ROOT)

# "numba-mkl": the numba backend with MKL for its per-step products (the
# `mkl` extra); "numba" is then timed without it (test_bench_train.py)
DEFAULT_BACKENDS = ("numba", "numba-mkl", "c", "cuda", "numpy", "torch")
DEFAULT_CELLS = ("rnn", "lstm", "gru")


def pytest_addoption(parser):
    group = parser.getgroup("fastrnn benchmarks")
    group.addoption(
        "--bench-backends", default=",".join(DEFAULT_BACKENDS),
        help="comma-separated implementations to time (fastrnn backends and "
             "'torch'); unavailable ones are skipped. Default: %(default)s")
    group.addoption(
        "--bench-cells", default=",".join(DEFAULT_CELLS),
        help="comma-separated cell types to time. Default: %(default)s")
    group.addoption(
        "--bench-slow-budget", type=float, default=3.0,
        help="seconds of timing to spend on one point whose single call is "
             "slow (>= 50 ms; it is timed with a few pedantic rounds instead "
             "of pytest-benchmark's calibration). Default: %(default)s")
