"""Helpers shared by the PyTorch-oracle tests (test_torch_rnn.py,
test_torch_lstm.py). Import only after ``pytest.importorskip("torch")``."""
import numpy as np
import torch

import fastrnn as fr
from conftest import assert_close

F64 = np.float64
TORCH_DTYPE = {np.dtype(np.float32): torch.float32,
               np.dtype(np.float64): torch.float64}
READOUT_KEYS = ("weight_out", "bias_out")


def _t(a, grad=False):
    """A torch tensor holding a copy of the NumPy array ``a``."""
    t = torch.tensor(np.array(a))
    return t.requires_grad_(True) if grad else t


def _np(t):
    return t.detach().cpu().numpy()


def _check_param_grads(layer, tm, dtype, what=""):
    names = [n for n, _ in tm.named_parameters()]
    assert sorted(layer.grads) == sorted(names), "layer.grads keys"
    for name, p in tm.named_parameters():
        assert_close(layer.grads[name], _np(p.grad), dtype,
                     f"{what} grad {name}")


def _make_optimizers(spec, params):
    """(fastrnn optimizer, torch optimizer) for the same rule and settings."""
    kind, kw = spec
    if kind == "sgd":
        return fr.SGD(kw["lr"], momentum=kw["momentum"]), torch.optim.SGD(
            params, lr=kw["lr"], momentum=kw["momentum"])
    if kind == "adam":
        return fr.Adam(kw["lr"]), torch.optim.Adam(params, lr=kw["lr"])
    if kind == "adagrad":
        # fr.Adagrad's documented default eps is 1e-8 (torch's is 1e-10)
        return fr.Adagrad(kw["lr"]), torch.optim.Adagrad(
            params, lr=kw["lr"], eps=1e-8)
    raise AssertionError(kind)


def _make_data(rng, T, B, I, O, loss, readout, steps):
    xs = [rng.standard_normal((T, B, I)) for _ in range(steps)]
    if loss == "cross_entropy":
        shape = (T, B) if readout == "all" else (B,)
        ys = [rng.integers(0, O, size=shape) for _ in range(steps)]
    else:
        shape = (T, B, O) if readout == "all" else (B, O)
        ys = [rng.standard_normal(shape) for _ in range(steps)]
    return xs, ys


def _grad_norm(params):
    return float(torch.sqrt(sum((p.grad ** 2).sum() for p in params)))


def _compare_params(model, tmodel, what):
    sd = model.state_dict()
    names = [n for n, _ in tmodel.named_parameters()]
    assert sorted(sd) == sorted(names), "model.state_dict() keys"
    for name, p in tmodel.named_parameters():
        assert_close(sd[name], _np(p), F64, f"{what}: {name}")
