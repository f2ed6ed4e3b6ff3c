"""Parameter initialisation schemes.

All draws are made in float64 from numpy's default_rng(seed), in state_dict
order, then cast: the same seed gives the same parameters on every backend.
"""
import numpy as np

from ._spec import views

SCHEMES = ("default", "orthogonal", "identity", "xavier")


def _xavier(rng, shape):
    fan_out, fan_in = shape
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


def _orthogonal(rng, n):
    """A random n x n orthogonal matrix (QR of a Gaussian, sign-corrected so
    the distribution is uniform, as torch.nn.init.orthogonal_)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def init_core(spec, flat, scheme, rng):
    """Fill the core part of `flat` according to `scheme`."""
    p = views(spec, flat)
    H, G = spec.H, spec.G
    if scheme == "identity" and spec.mode in ("lstm", "gru"):
        raise ValueError("init: 'identity' (IRNN) is defined for fr.RNN only; "
                         f"use 'default', 'orthogonal' or 'xavier' for the "
                         f"{spec.mode.upper()}")
    for k in range(spec.L):
        for d in range(spec.D):
            names = spec.names(k, d)
            w_ih, w_hh = p[names[0]], p[names[1]]
            biases = [p[n] for n in names[2:]]
            if scheme == "default":
                bound = 1.0 / np.sqrt(H)
                for arr in [w_ih, w_hh] + biases:
                    arr[...] = rng.uniform(-bound, bound, size=arr.shape)
            elif scheme == "orthogonal":
                w_ih[...] = _xavier(rng, w_ih.shape)
                for gblk in range(G):
                    w_hh[gblk * H:(gblk + 1) * H] = _orthogonal(rng, H)
                for b in biases:
                    b[...] = 0
                if spec.mode == "lstm" and biases:
                    biases[0][H:2 * H] = 1.0  # forget-gate block of bias_ih
            elif scheme == "identity":
                w_ih[...] = rng.normal(0.0, 0.001, size=w_ih.shape)
                w_hh[...] = np.eye(H)
                for b in biases:
                    b[...] = 0
            elif scheme == "xavier":
                w_ih[...] = _xavier(rng, w_ih.shape)
                w_hh[...] = _xavier(rng, w_hh.shape)
                for b in biases:
                    b[...] = 0
            else:
                raise ValueError(f"init: expected one of {SCHEMES}, got {scheme!r}")


def init_readout(spec, flat, rng):
    """PyTorch nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    p = views(spec, flat)
    bound = 1.0 / np.sqrt(spec.D * spec.H)
    p["weight_out"][...] = rng.uniform(-bound, bound, size=p["weight_out"].shape)
    p["bias_out"][...] = rng.uniform(-bound, bound, size=p["bias_out"].shape)
