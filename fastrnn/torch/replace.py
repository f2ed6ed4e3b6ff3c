"""replace(model): swap torch.nn.RNN / nn.LSTM / nn.GRU submodules for fastrnn.torch's
with the same weights, in place. A submodule with an option fastrnn cannot
honour (dropout > 0, proj_size > 0, a non-CPU device, a dtype other than
float32/float64) stays as it is, with a warning naming it."""
import warnings

from torch import nn

from fastrnn.torch.modules import GRU, LSTM, RNN

_TYPES = (nn.RNN, nn.LSTM, nn.GRU)


def _convert(m, backend):
    """The fastrnn module for torch module m, or the reason why not."""
    if m.dropout:
        return None, f"dropout={m.dropout}"
    if getattr(m, "proj_size", 0):
        return None, f"proj_size={m.proj_size}"
    p = next(m.parameters())
    if p.device.type != "cpu":
        return None, f"device={p.device}"
    if not p.is_floating_point() or p.dtype.itemsize not in (4, 8):
        return None, f"dtype={p.dtype}"
    kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
              bidirectional=m.bidirectional, device=p.device, dtype=p.dtype,
              backend=backend)
    if isinstance(m, nn.LSTM):
        new = LSTM(m.input_size, m.hidden_size, **kw)
    elif isinstance(m, nn.GRU):
        new = GRU(m.input_size, m.hidden_size, **kw)
    else:
        new = RNN(m.input_size, m.hidden_size, nonlinearity=m.nonlinearity, **kw)
    new.load_state_dict(m.state_dict())
    for name, p in m.named_parameters():
        getattr(new, name).requires_grad_(p.requires_grad)
    new.train(m.training)
    return new, None


def replace(model, *, backend="auto"):
    """Swap every torch.nn.RNN / nn.LSTM / nn.GRU inside `model` (and `model`
    itself) for fastrnn.torch.RNN / LSTM / GRU with the same weights and
    options.

    Submodules are replaced in place and `model` is returned -- unless
    `model` is itself an nn.RNN/nn.LSTM/nn.GRU, when the new module is returned.
    Training mode and requires_grad flags carry over; a module reached
    under two names becomes one shared fastrnn module; hooks registered on
    the old modules do not carry over.
    Call it before building the optimizer: the new modules have new
    Parameter objects. Submodules that cannot be converted are left as
    they are, with a warning naming them (e.g. ``encoder.rnn``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if type(model) in _TYPES:
        new, why = _convert(model, backend)
        if new is None:
            warnings.warn(f"fastrnn.torch.replace: kept the model ({type(model).__name__}) "
                          f"as it is: {why} is not supported", stacklevel=2)
            return model
        return new
    done = {}      # a module shared by several parents stays shared
    for qual, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in _TYPES:
                continue
            if id(child) not in done:
                full = f"{qual}.{name}" if qual else name
                new, why = _convert(child, backend)
                if new is None:
                    warnings.warn(f"fastrnn.torch.replace: kept {full} "
                                  f"({type(child).__name__}) as it is: {why} is "
                                  "not supported", stacklevel=2)
                done[id(child)] = new
            if done[id(child)] is not None:
                setattr(parent, name, done[id(child)])
    return model
