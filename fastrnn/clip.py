"""Gradient clipping rules, applied inside the fused training step.

ClipNorm(max_norm): with g the L2 norm of all parameter gradients together,
if g > max_norm every gradient is scaled by max_norm / g (Pascanu et al. 2013).
ClipValue(limit): every gradient element is clamped to [-limit, limit].
"""
from ._validate import check_positive


class ClipNorm:
    kind = "norm"

    def __init__(self, max_norm):
        self.max_norm = check_positive("max_norm", max_norm)

    @property
    def limit(self):
        return self.max_norm

    def __repr__(self):
        return f"ClipNorm({self.max_norm!r})"


class ClipValue:
    kind = "value"

    def __init__(self, limit):
        self.limit = check_positive("limit", limit)

    def __repr__(self):
        return f"ClipValue({self.limit!r})"
