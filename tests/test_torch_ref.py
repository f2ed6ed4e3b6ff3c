"""fastrnn._torch_ref.TorchTrainStep, the PyTorch step that `fastrnn bench`
and the benchmarks measure fastrnn against, is the same training step as
fr.TrainStep: same losses and parameters over a few steps (float64), and
importing it (or fastrnn) does not import torch."""
import subprocess
import sys

import numpy as np
import pytest

import fastrnn as fr


def test_importing_the_helper_does_not_import_torch():
    code = ("import sys, fastrnn, fastrnn._torch_ref; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("cell,optimizer,clip_norm", [
    ("rnn", "sgd", None), ("lstm", "sgd", None), ("rnn", "adam", 0.5),
    ("lstm", "adam", 0.5)])
def test_torch_step_equals_the_fused_step(cell, optimizer, clip_norm):
    pytest.importorskip("torch")
    from fastrnn._torch_ref import TorchTrainStep
    T, B, I, H, O, lr, steps = 4, 3, 3, 5, 4, 0.1, 3
    make = fr.LSTM if cell == "lstm" else fr.RNN
    model = fr.SequenceModel(make(I, H, dtype=np.float64, seed=1, backend="numpy"), O)
    opt = fr.Adam(lr) if optimizer == "adam" else fr.SGD(lr)
    clip = fr.ClipNorm(clip_norm) if clip_norm is not None else None
    step = fr.TrainStep(model, opt, clip=clip)
    ref = TorchTrainStep(cell, I, H, O, model.state_dict(), dtype=np.float64,
                         optimizer=optimizer, lr=lr, clip_norm=clip_norm)
    # torch's clip_grad_norm_ scales by max_norm / (norm + 1e-6), fastrnn's
    # ClipNorm by max_norm / norm: with clipping, the steps agree to ~1e-6
    rtol = 1e-9 if clip_norm is None else 1e-5
    rng = np.random.default_rng(0)
    clipped = False
    for k in range(steps):
        x = rng.standard_normal((T, B, I))
        y = rng.integers(0, O, (T, B))
        res = step(x, y)
        clipped |= bool(res.clipped)
        np.testing.assert_allclose(ref(*ref.tensors(x, y)), res.loss, rtol=rtol,
                                   err_msg=f"step {k}: loss")
    if clip_norm is not None:
        assert clipped, "test setup: clipping never happened"
    got, exp = ref.state_dict(), model.state_dict()
    assert sorted(got) == sorted(exp)
    for k in exp:
        np.testing.assert_allclose(got[k], exp[k], rtol=rtol,
                                   atol=rtol * np.abs(exp[k]).max(), err_msg=k)


def test_bad_cell_or_optimizer_is_named():
    pytest.importorskip("torch")
    from fastrnn._torch_ref import TorchTrainStep
    with pytest.raises(ValueError, match="cell"):
        TorchTrainStep("transformer", 2, 3, 2)
    with pytest.raises(ValueError, match="optimizer"):
        TorchTrainStep("rnn", 2, 3, 2, optimizer="rmsprop")
