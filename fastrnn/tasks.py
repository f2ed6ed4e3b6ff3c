"""Synthetic sequence tasks, generated on the fly from a seeded generator.

Each task has: input_size, output_size, loss, readout, ``batch(rng, B)``
returning (x, y) time-major, ``metric(z, y)`` (lower is better) and
``solved(metric)``.
"""
import numpy as np


class Adding:
    """The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015).

    Input (T, B, 2): channel 0 holds values U(0, 1), channel 1 marks two
    positions (one in each half of the sequence). Target: the sum of the two
    marked values, read out at the last step (mse). Always predicting 1 gives
    MSE 1/6; the task counts as solved at test MSE < 0.01.
    """
    name = "adding"
    input_size, output_size = 2, 1
    loss, readout = "mse", "last"
    baseline = 1.0 / 6.0
    threshold = 0.01

    def __init__(self, T=100):
        if T < 2:
            raise ValueError(f"T: the adding problem needs T >= 2, got {T}")
        self.T = T

    def batch(self, rng, B):
        T = self.T
        x = np.zeros((T, B, 2))
        x[:, :, 0] = rng.uniform(0, 1, (T, B))
        half = T // 2
        i = rng.integers(0, half, B)
        j = rng.integers(half, T, B)
        b = np.arange(B)
        x[i, b, 1] = 1
        x[j, b, 1] = 1
        y = (x[i, b, 0] + x[j, b, 0])[:, None]
        return x, y

    def metric(self, z, y):
        return float(np.mean((z - y) ** 2))

    def solved(self, m):
        return m < self.threshold


TASKS = {"adding": Adding}


def make_task(name, T):
    if name not in TASKS:
        raise ValueError(f"task: expected one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name](T)
