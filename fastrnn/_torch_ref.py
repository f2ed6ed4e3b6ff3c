"""The PyTorch training step fastrnn is measured against: ``nn.RNN``,
``nn.LSTM`` or ``nn.GRU`` + ``nn.Linear`` read-out, cross-entropy at every step summed over
time and averaged over the batch (the loss of ``fr.SequenceModel``),
optional ``clip_grad_norm_``, an SGD or Adam update. One definition for
``fastrnn bench``, the benchmarks (benchmarks/) and the tests that check it.

torch is imported when a step is built, never by ``import fastrnn``.
"""
import numpy as np

_READOUT = ("weight_out", "bias_out")


class TorchTrainStep:
    """One training step in PyTorch, from fastrnn's parameters.

    ``cell`` is "rnn", "lstm" or "gru"; the core has input size ``I``, hidden size
    ``H`` (one layer, one direction), the read-out ``O`` outputs.
    ``params``: a fastrnn ``model.state_dict()`` (PyTorch's names plus
    ``weight_out``/``bias_out``) to start from; None keeps torch's own
    initialisation. ``optimizer``: "sgd" or "adam" with learning rate
    ``lr``; ``clip_norm``: None or the max_norm of ``clip_grad_norm_``.
    ``step(xt, yt)`` takes tensors from ``tensors(x, y)`` (x ``(T, B, I)``
    floats, y ``(T, B)`` class ids) and returns the loss before the update.
    """

    def __init__(self, cell, I, H, O, params=None, *, nonlinearity="tanh",
                 dtype=np.float32, device="cpu", optimizer="sgd", lr=0.01,
                 clip_norm=None):
        import torch
        if cell not in ("rnn", "lstm", "gru"):
            raise ValueError(f"cell must be 'rnn', 'lstm' or 'gru', got {cell!r}")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self._torch = torch
        self.device = torch.device(device)
        tdtype = {np.dtype(np.float32): torch.float32,
                  np.dtype(np.float64): torch.float64}[np.dtype(dtype)]
        if cell == "rnn":
            core = torch.nn.RNN(I, H, nonlinearity=nonlinearity)
        else:
            core = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](I, H)
        self.core = core.to(device=self.device, dtype=tdtype)
        self.lin = torch.nn.Linear(H, O).to(device=self.device, dtype=tdtype)
        if params is not None:
            self.core.load_state_dict({k: self._tensor(v) for k, v in params.items()
                                       if k not in _READOUT})
            with torch.no_grad():
                self.lin.weight.copy_(self._tensor(params["weight_out"]))
                self.lin.bias.copy_(self._tensor(params["bias_out"]))
        self.params = list(self.core.parameters()) + list(self.lin.parameters())
        opt = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        self.opt = opt(self.params, lr=lr)
        self.O, self.clip_norm = O, clip_norm

    def _tensor(self, a):
        return self._torch.from_numpy(np.array(a)).to(self.device)

    def tensors(self, x, y):
        """(x, y) as tensors on the step's device, y flattened to (T*B,)."""
        return self._tensor(x), self._tensor(y).reshape(-1)

    def __call__(self, xt, yt):
        F = self._torch.nn.functional
        self.opt.zero_grad(set_to_none=True)
        out, _ = self.core(xt)
        z = self.lin(out).reshape(-1, self.O)
        loss = F.cross_entropy(z, yt, reduction="sum") / xt.shape[1]
        loss.backward()
        if self.clip_norm is not None:
            self._torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.opt.step()
        return loss.item()

    def state_dict(self):
        """The parameters as NumPy copies, with fastrnn's names."""
        d = {k: v.detach().cpu().numpy().copy()
             for k, v in self.core.state_dict().items()}
        d["weight_out"] = self.lin.weight.detach().cpu().numpy().copy()
        d["bias_out"] = self.lin.bias.detach().cpu().numpy().copy()
        return d
