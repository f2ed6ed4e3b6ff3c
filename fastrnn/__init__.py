"""fastrnn: fast, exact training of Elman RNNs, LSTMs and GRUs from Python.

    import fastrnn as fr
    model = fr.SequenceModel(fr.RNN(8, 64), 10)
    step = fr.TrainStep(model, fr.Adam(1e-3), clip=fr.ClipNorm(1.0))
    res = step(x, y)          # forward, loss, BPTT, clipping, update: one call
"""
from .backends import available_backends
from .checkpoint import load, save
from .clip import ClipNorm, ClipValue
from .layers import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .model import SequenceModel, StepResult, TrainStep, gradient_flow
from .optim import SGD, Adagrad, Adam

__version__ = "0.1.0"

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "SequenceModel", "TrainStep",
           "StepResult", "gradient_flow", "SGD", "Adam", "Adagrad", "ClipNorm",
           "ClipValue", "available_backends", "save", "load", "__version__"]
