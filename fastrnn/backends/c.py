"""C backend (fused cell updates through cffi): not built yet."""


def available():
    return False, ("the C extension is not part of this build yet "
                   "(planned: csrc/ fused kernels through cffi)")
