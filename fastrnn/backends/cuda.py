"""CUDA backend (numba.cuda kernels): not implemented yet."""


def available():
    return False, "the CUDA backend is not implemented in this version"
