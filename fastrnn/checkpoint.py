"""Checkpoints: a SequenceModel with what it takes to rebuild it, its
optimizer state, the training step count and anything else the caller
needs to resume exactly (a task's random generator, a carried state, ...).

    fr.save(path, model, step, train_step=step_fn, extra={"rng": rng})
    ck = fr.load(path)        # ck.model, ck.train_step, ck.step, ck.extra

The file is an uncompressed ``.npz`` archive (no pickles): the parameters
under ``param/<name>`` (the state_dict names), the optimizer moments under
``opt_state``, arrays from ``extra`` under ``extra/<n>``, and a JSON
document ``meta`` with the core's constructor arguments, the read-out, the
optimizer, clipping and step count, and the rest of ``extra``.

The write is atomic: the archive goes to a temporary file in the same
directory, is flushed and fsync'ed, then renamed over `path` with
``os.replace``. A crash at any point leaves either the previous file or the
new one, never a partial file.
"""
import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

FORMAT = "fastrnn-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """What ``fr.load`` returns."""
    model: object                 # fr.SequenceModel, parameters loaded
    step: object = None           # the step number given to save (or None)
    train_step: object = None     # fr.TrainStep with moments and step count, or None
    extra: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)   # the raw JSON document


# -- describing and rebuilding the model -----------------------------------

def _model_config(model):
    from .layers import LSTM
    core = model.core
    cfg = {"cell": "lstm" if isinstance(core, LSTM) else "rnn",
           "input_size": core.input_size, "hidden_size": core.hidden_size,
           "num_layers": core.num_layers, "bias": core.bias,
           "batch_first": core.batch_first, "bidirectional": core.bidirectional,
           "dtype": np.dtype(core.dtype).name, "init": core.init, "seed": core.seed,
           "backend": core.backend}
    if cfg["cell"] == "rnn":
        cfg["nonlinearity"] = core.nonlinearity
    cfg.update(output_size=model.output_size, loss=model.loss, readout=model.readout)
    return cfg


def _build_model(cfg, backend):
    from . import backends
    from .layers import LSTM, RNN
    from .model import SequenceModel
    if backend is None:
        backend = cfg["backend"]
        if not backends.available_backends().get(backend, (False,))[0]:
            backend = "auto"
    kw = dict(num_layers=cfg["num_layers"], bias=cfg["bias"],
              batch_first=cfg["batch_first"], bidirectional=cfg["bidirectional"],
              dtype=np.dtype(cfg["dtype"]), init=cfg["init"], seed=cfg["seed"],
              backend=backend)
    if cfg["cell"] == "lstm":
        core = LSTM(cfg["input_size"], cfg["hidden_size"], **kw)
    else:
        core = RNN(cfg["input_size"], cfg["hidden_size"],
                   nonlinearity=cfg["nonlinearity"], **kw)
    return SequenceModel(core, cfg["output_size"], loss=cfg["loss"], readout=cfg["readout"])


def _train_step_config(ts):
    clip = ts.clip
    return {"optimizer": ts.optimizer.kind, "hyper": dict(ts.optimizer.hyper),
            "clip": None if clip is None else clip.kind,
            "clip_limit": None if clip is None else float(clip.limit),
            "state_clip": ts.state_clip, "on_nonfinite": ts.on_nonfinite,
            "steps": int(ts.steps)}


def _build_train_step(model, cfg, opt_state):
    from .clip import ClipNorm, ClipValue
    from .model import TrainStep
    from .optim import SGD, Adagrad, Adam
    h = cfg["hyper"]
    kind = cfg["optimizer"]
    if kind == "sgd":
        opt = SGD(h["lr"], momentum=h["momentum"])
    elif kind == "adam":
        opt = Adam(h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"])
    elif kind == "adagrad":
        opt = Adagrad(h["lr"], eps=h["eps"])
    else:
        raise ValueError(f"checkpoint: unknown optimizer {kind!r}")
    clip = {None: lambda: None, "norm": lambda: ClipNorm(cfg["clip_limit"]),
            "value": lambda: ClipValue(cfg["clip_limit"])}[cfg["clip"]]()
    ts = TrainStep(model, opt, clip=clip, state_clip=cfg["state_clip"],
                   on_nonfinite=cfg["on_nonfinite"])
    ts.load_state_dict({"opt_state": opt_state, "steps": cfg["steps"]})
    return ts


# -- extra: JSON with arrays, tuples and random generators -----------------

def _encode(obj, arrays, where):
    if isinstance(obj, np.ndarray):
        key = f"extra/{len([k for k in arrays if k.startswith('extra/')])}"
        arrays[key] = obj
        return {"__array__": key}
    if isinstance(obj, np.random.Generator):
        return {"__generator__": obj.bit_generator.state}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"extra{where}: keys must be str, got {k!r}")
            out[k] = _encode(v, arrays, f"{where}[{k!r}]")
        return out
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"extra{where}: cannot store a {type(obj).__name__} (expected "
                    "arrays, numbers, str, None, lists, tuples, dicts with str keys, "
                    "numpy Generators)")


def _decode(obj, z):
    if isinstance(obj, list):
        return [_decode(v, z) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return z[obj["__array__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, z) for v in obj["__tuple__"])
        if set(obj) == {"__generator__"}:
            state = obj["__generator__"]
            bg = getattr(np.random, state["bit_generator"])()
            bg.state = state
            return np.random.Generator(bg)
        return {k: _decode(v, z) for k, v in obj.items()}
    return obj


# -- atomic write ----------------------------------------------------------

def _write_arrays(f, arrays):
    """Write the archive to the open binary file f (tests replace this to
    simulate a crash part-way through)."""
    np.savez(f, **arrays)


def _fsync_dir(d):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call write(f) on a temporary file beside `path`, fsync it, then rename
    it over `path`. On any error the temporary file is removed and `path` is
    left as it was."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


# -- public ----------------------------------------------------------------

def save(path, model, step=None, *, train_step=None, extra=None):
    """Write a checkpoint of `model` to `path`, atomically.

    step: the training step it was taken at (an int, or None).
    train_step: an fr.TrainStep of this model: its optimizer, clipping,
    moments and update count are saved too, and ``load`` rebuilds it.
    extra: a dict of anything else to restore (str keys; values: numbers,
    str, None, arrays, lists, tuples, dicts, numpy Generators -- a Generator
    comes back in the same state).
    """
    from .model import SequenceModel, TrainStep
    if not isinstance(model, SequenceModel):
        raise TypeError(f"model: expected an fr.SequenceModel, got {type(model).__name__}")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step: expected an int or None, got {step!r}")
        step = int(step)
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra: expected a dict or None, got {type(extra).__name__}")
    arrays = {f"param/{k}": v for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, "step": step,
            "model": _model_config(model)}
    if train_step is not None:
        if not isinstance(train_step, TrainStep):
            raise TypeError(f"train_step: expected an fr.TrainStep, "
                            f"got {type(train_step).__name__}")
        if train_step.model is not model:
            raise ValueError("train_step: expected the TrainStep of this model")
        meta["train_step"] = _train_step_config(train_step)
        arrays["opt_state"] = train_step.opt_state.copy()
    meta["extra"] = _encode({} if extra is None else extra, arrays, "")
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    atomic_write(path, lambda f: _write_arrays(f, arrays))


def load(path, *, backend=None):
    """Read a checkpoint written by ``save``; returns a ``Checkpoint`` with the
    rebuilt model (and TrainStep, if one was saved), step and extra.

    backend: None uses the saved model's backend when it is available here
    (else "auto"); a name forces one.
    """
    with np.load(os.fspath(path), allow_pickle=False) as z:
        if "meta" not in z.files:
            raise ValueError(f"{path}: not a fastrnn checkpoint (no 'meta' entry)")
        meta = json.loads(bytes(z["meta"]).decode("utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a fastrnn checkpoint (format "
                             f"{meta.get('format')!r})")
        if meta.get("version", 0) > VERSION:
            raise ValueError(f"{path}: checkpoint version {meta['version']} is newer "
                             f"than this fastrnn reads ({VERSION})")
        model = _build_model(meta["model"], backend)
        model.load_state_dict({k[len("param/"):]: z[k] for k in z.files
                               if k.startswith("param/")})
        ts = None
        if "train_step" in meta:
            ts = _build_train_step(model, meta["train_step"], z["opt_state"])
        extra = _decode(meta["extra"], z)
    return Checkpoint(model=model, step=meta["step"], train_step=ts, extra=extra,
                      meta=meta)
