"""Shared test helpers: one table of tolerances by dtype, backend fixture."""
import numpy as np
import pytest

import fastrnn as fr

# One table of tolerances, by dtype: relative tolerance, and an absolute floor
# that is the same relative tolerance times the largest magnitude of the
# expected array (so values near zero inside a tensor are not held to an
# impossible elementwise relative bound).
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}


def assert_close(actual, expected, dtype=None, err_msg=""):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dtype = np.dtype(dtype if dtype is not None else actual.dtype)
    rtol = RTOL[dtype]
    assert actual.shape == expected.shape, (
        f"{err_msg}: shape {actual.shape} != expected {expected.shape}")
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol,
                               atol=rtol * max(scale, 1e-30), err_msg=err_msg)


def short_reason(why):
    """The head of an availability reason, for skip messages (which pytest
    repeats per test location): without the list of what was tried, up to
    the first full stop. The whole reason is in fr.available_backends()."""
    return why.split("; tried ")[0].split(". ")[0]


def _available(name):
    return fr.available_backends()[name][0]


FAST_BACKENDS = [b for b in ("numba", "c", "cuda")]


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    """Every non-reference backend; skips (with the reason) when unavailable."""
    ok, why = fr.available_backends()[request.param]
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable: {short_reason(why)}")
    return request.param


@pytest.fixture(params=["numpy"] + FAST_BACKENDS)
def backend(request):
    """Every backend including the reference."""
    ok, why = fr.available_backends()[request.param]
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable: {short_reason(why)}")
    return request.param
