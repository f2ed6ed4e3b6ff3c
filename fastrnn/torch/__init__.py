"""fastrnn.torch: drop-in torch.nn modules on fastrnn's compiled kernels.

    import fastrnn.torch as frt
    lstm = frt.LSTM(8, 64, num_layers=2)          # instead of torch.nn.LSTM
    model = frt.replace(model)                    # or swap them in a model

Needs PyTorch (``pip install "fastrnn[torch]"``); ``import fastrnn`` never
imports it. See modules.py (the modules), ops.py (the autograd glue) and
replace.py (swapping torch's modules in an existing model).
"""
from fastrnn.torch.modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from fastrnn.torch.replace import replace

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "replace"]
