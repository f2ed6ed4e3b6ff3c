"""Gradient clipping rules, applied inside the fused training step.

ClipNorm(max_norm): with g the L2 norm of all parameter gradients together,
if g > max_norm every gradient is scaled by max_norm / g (Pascanu et al. 2013).
ClipValue(limit): every gradient element is clamped to [-limit, limit].

Limits are those torch.nn.utils.clip_grad_norm_ / clip_grad_value_ give a
meaning to: any number >= 0, inf included (no clipping); 0 zeroes every
gradient. Negative limits and NaN, which PyTorch accepts silently (a
negative max_norm flips the sign of every gradient), raise ValueError.
"""
from ._validate import check_range


class ClipNorm:
    kind = "norm"

    def __init__(self, max_norm):
        self.max_norm = check_range("max_norm", max_norm)

    @property
    def limit(self):
        return self.max_norm

    def __repr__(self):
        return f"ClipNorm({self.max_norm!r})"


class ClipValue:
    kind = "value"

    def __init__(self, limit):
        self.limit = check_range("limit", limit)

    def __repr__(self):
        return f"ClipValue({self.limit!r})"
