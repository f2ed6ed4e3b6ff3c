"""Checkpoints: a SequenceModel with what it takes to rebuild it, its
optimizer state, the training step count and anything else the caller
needs to resume exactly (a task's random generator, a carried state, ...).

    fr.save(path, model, step, train_step=step_fn, extra={"rng": rng})
    ck = fr.load(path)        # ck.model, ck.train_step, ck.step, ck.extra
    ck = fr.load(run_dir)     # a directory: its checkpoint.npz

The file is an uncompressed ``.npz`` archive (no pickles): the parameters
under ``param/<name>`` (the state_dict names), the optimizer moments under
``opt_state``, arrays from ``extra`` under ``extra/<n>``, and a JSON
document ``meta`` with the core's constructor arguments, the read-out, the
optimizer, clipping and step count, and the rest of ``extra``.

The write is atomic: the archive goes to a temporary file in the same
directory (``.<name>.<pid>-<random>.tmp``, created with the permissions an
ordinary write would give), is flushed and fsync'ed, then renamed over
`path` with ``os.replace``. A crash at any point leaves either the previous
file or the new one, never a partial file; the temporary files a killed
save leaves behind are removed by the next save to the same path.

Reading trusts nothing in the file: every field of ``meta`` is checked, the
parameter shapes it implies are compared with the stored arrays' headers
before any model is built, random generators are rebuilt only from a fixed
table of NumPy bit generators, and anything else (a damaged archive, another
program's ``.npz``, a text file) is a ``ValueError`` naming the file.
"""
import json
import os
import re
import secrets
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

FORMAT = "fastrnn-checkpoint"
VERSION = 1
RUN_CHECKPOINT = "checkpoint.npz"      # the checkpoint's name in a run directory

# the only bit generators a checkpoint may name (never looked up by name in np.random)
BIT_GENERATORS = {"PCG64": np.random.PCG64, "PCG64DXSM": np.random.PCG64DXSM,
                  "Philox": np.random.Philox, "SFC64": np.random.SFC64,
                  "MT19937": np.random.MT19937}
META_MAX_BYTES = 64 << 20


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
    from .layers import GRU, LSTM
    core = model.core
    cell = "lstm" if isinstance(core, LSTM) else "gru" if isinstance(core, GRU) else "rnn"
    cfg = {"cell": cell,
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
    from .layers import GRU, LSTM, RNN
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
    elif cfg["cell"] == "gru":
        core = GRU(cfg["input_size"], cfg["hidden_size"], **kw)
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
        state = obj.bit_generator.state
        if state.get("bit_generator") not in BIT_GENERATORS:
            raise TypeError(f"extra{where}: cannot store a Generator on "
                            f"{type(obj.bit_generator).__name__} (expected one of "
                            f"{', '.join(BIT_GENERATORS)})")
        return {"__generator__": _encode(state, arrays, f"{where}.state")}
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


def _decode(obj, ar, where):
    """The value stored as `obj` (JSON) with arrays from the archive `ar`;
    `where` names the field in errors: extra['rng'][0]."""
    if isinstance(obj, list):
        return [_decode(v, ar, f"{where}[{i}]") for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__array__"}:
        key = obj["__array__"]
        if not isinstance(key, str) or not key.startswith("extra/") or key not in ar.names:
            ar.fail(where, f"refers to {key!r}, which is not an extra/ array in the file")
        return ar.array(key)
    if set(obj) == {"__tuple__"}:
        if not isinstance(obj["__tuple__"], list):
            ar.fail(where, "a tuple must be stored as a list")
        return tuple(_decode(v, ar, f"{where}[{i}]") for i, v in enumerate(obj["__tuple__"]))
    if set(obj) == {"__generator__"}:
        return _generator(_decode(obj["__generator__"], ar, f"{where}.state"), ar, where)
    return {k: _decode(v, ar, f"{where}[{k!r}]") for k, v in obj.items()}


def _generator(state, ar, where):
    """A numpy Generator on a bit generator from the fixed table, in `state`."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if not isinstance(name, str) or name not in BIT_GENERATORS:
        ar.fail(where, f"bit generator {name!r} is not one of {', '.join(BIT_GENERATORS)}")
    bg = BIT_GENERATORS[name](0)
    try:
        bg.state = state
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        ar.fail(where, f"not a valid {name} bit generator state ({e})")
    return np.random.Generator(bg)


# -- reading: the archive, checked ------------------------------------------

# what zipfile and numpy's format functions raise on a damaged archive
_READ_ERRORS = (zipfile.BadZipFile, ValueError, EOFError, OSError, struct.error, zlib.error,
                SyntaxError, TypeError, NotImplementedError, RuntimeError, OverflowError,
                MemoryError)


class _Archive:
    """The entries of an .npz archive read with zipfile and numpy's .npy
    format functions: headers can be checked before any data is read, and
    every failure is a ValueError naming the file."""

    def __init__(self, path):
        self.path = path
        self.size = os.path.getsize(path)
        try:
            self.zip = zipfile.ZipFile(path)
        except _READ_ERRORS as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise           # could not read the file at all: say so as it is
            raise ValueError(f"{path}: not a fastrnn checkpoint (not a complete .npz "
                             f"archive: a damaged or truncated file, or another kind "
                             f"of file)") from None
        self.entries = {}
        total = 0
        for info in self.zip.infolist():
            if not info.filename.endswith(".npy"):
                continue
            if (info.compress_type != zipfile.ZIP_STORED
                    or info.file_size != info.compress_size):
                self.close()
                raise ValueError(f"{path}: not a fastrnn checkpoint (entry "
                                 f"{info.filename!r} is compressed; fastrnn writes "
                                 "uncompressed archives)")
            total += info.file_size
            self.entries[info.filename[:-4]] = info
        if total > self.size:
            self.close()
            raise ValueError(f"{path}: not a fastrnn checkpoint (its entries claim "
                             f"{total} bytes in a file of {self.size})")
        self.names = set(self.entries)

    def close(self):
        self.zip.close()

    def fail(self, field, problem):
        raise ValueError(f"{self.path}: field {field}: {problem}")

    def _damaged(self, name, e):
        return ValueError(f"{self.path}: not a fastrnn checkpoint, or a damaged one "
                          f"(entry {name!r}: {e})")

    def header(self, name):
        """(shape, dtype) of an entry, from its .npy header only."""
        try:
            with self.zip.open(self.entries[name]) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                start = f.tell()
        except _READ_ERRORS as e:
            raise self._damaged(name, e) from None
        if dtype.hasobject:
            raise self._damaged(name, "it holds Python objects")
        n = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if start + n != self.entries[name].file_size:
            raise self._damaged(name, f"its header says {shape} {dtype}, the entry holds "
                                f"{self.entries[name].file_size - start} bytes of data")
        return shape, dtype

    def array(self, name):
        self.header(name)
        try:
            with self.zip.open(self.entries[name]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except _READ_ERRORS as e:
            raise self._damaged(name, e) from None


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _one_of(*choices):
    names = " or ".join(map(repr, choices))
    return (lambda v: isinstance(v, str) and v in choices), names


def _field(ar, d, key, where, check, expected):
    if not isinstance(d, dict) or key not in d:
        ar.fail(f"{where}.{key}" if where else key, f"missing (expected {expected})")
    v = d[key]
    if not check(v):
        ar.fail(f"{where}.{key}" if where else key, f"expected {expected}, got {v!r}")
    return v


def _read_meta(ar):
    if "meta" not in ar.names:
        raise ValueError(f"{ar.path}: not a fastrnn checkpoint (no 'meta' entry)")
    shape, dtype = ar.header("meta")
    if dtype != np.uint8 or len(shape) != 1 or shape[0] > META_MAX_BYTES:
        raise ValueError(f"{ar.path}: not a fastrnn checkpoint ('meta' is {shape} {dtype}, "
                         "not a JSON document)")
    try:
        meta = json.loads(bytes(ar.array("meta")).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{ar.path}: not a fastrnn checkpoint ('meta' is not a JSON "
                         "document)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{ar.path}: not a fastrnn checkpoint (format {fmt!r})")
    version = _field(ar, meta, "version", "", _is_int, "an int")
    if version > VERSION:
        raise ValueError(f"{ar.path}: checkpoint version {version} is newer "
                         f"than this fastrnn reads ({VERSION})")
    _field(ar, meta, "step", "", lambda v: v is None or _is_int(v), "an int or null")
    return meta


def _check_model(ar, meta):
    """Check meta['model'] field by field, then against the stored arrays'
    shapes (headers only): returns the Spec of the stored parameters. No
    model is built and nothing the size of a claimed dimension is allocated."""
    from ._spec import LOSSES, MODES, READOUTS, make_spec
    cfg = _field(ar, meta, "model", "", lambda v: isinstance(v, dict), "a JSON object")
    f = lambda key, check, expected: _field(ar, cfg, key, "model", check, expected)  # noqa
    pos = lambda v: _is_int(v) and v >= 1  # noqa: E731
    is_bool = lambda v: isinstance(v, bool)  # noqa: E731
    cell = f("cell", *_one_of("rnn", "lstm", "gru"))
    I, H, L = (f(k, pos, "an int >= 1") for k in ("input_size", "hidden_size", "num_layers"))
    bias, _, bidir = (f(k, is_bool, "true or false")
                      for k in ("bias", "batch_first", "bidirectional"))
    dtype = f("dtype", *_one_of("float32", "float64"))
    f("init", lambda v: isinstance(v, str), "a str")
    f("seed", lambda v: v is None or _is_int(v), "an int or null")
    f("backend", lambda v: isinstance(v, str), "a str")
    mode = cell
    if cell == "rnn":
        mode = f("nonlinearity", *_one_of(*(m for m in MODES if m not in ("lstm", "gru"))))
    O = f("output_size", pos, "an int >= 1")
    loss = f("loss", *_one_of(*LOSSES))
    readout = f("readout", *_one_of(*READOUTS))
    D = 2 if bidir else 1
    stored = sorted(k[len("param/"):] for k in ar.names if k.startswith("param/"))
    n_expected = L * D * (4 if bias else 2) + 2
    if n_expected > len(stored) + 8:        # (a layout that long is not worth listing)
        ar.fail("model", f"num_layers={L}, bidirectional={bidir}, bias={bias} give "
                f"{n_expected} parameter arrays; the file holds {len(stored)}")
    spec = make_spec(mode, I, H, L, D, bias, O=O, loss=loss, readout=readout)
    dims = (f"cell={cell!r}, input_size={I}, hidden_size={H}, num_layers={L}, "
            f"bidirectional={bidir}, bias={bias}, output_size={O}")
    for name in spec.layout:
        if name not in stored:
            ar.fail("model", f"{dims} give a parameter param/{name}, which the file "
                    "does not hold")
    for name in stored:
        if name not in spec.layout:
            ar.fail("model", f"{dims} have no parameter {name}, which the file holds")
    for name, (_, shape) in spec.layout.items():
        got, dt = ar.header("param/" + name)
        if tuple(got) != tuple(shape):
            ar.fail("model", f"{dims} give param/{name} the shape {tuple(shape)}; the "
                    f"file holds {tuple(got)}")
        if dt.kind != "f" or dt.itemsize != np.dtype(dtype).itemsize:
            ar.fail("model", f"dtype={dtype!r}, but param/{name} is stored as {dt}")
    return spec


HYPER = {"sgd": ("lr", "momentum"), "adam": ("lr", "beta1", "beta2", "eps"),
         "adagrad": ("lr", "eps")}


def _check_train_step(ar, meta, spec):
    """Check meta['train_step'] and the stored moments' shape (header only)."""
    from ._spec import n_params
    ts = meta["train_step"]
    f = lambda key, check, expected, d=ts, w="train_step": _field(  # noqa: E731
        ar, d, key, w, check, expected)
    if not isinstance(ts, dict):
        ar.fail("train_step", f"expected a JSON object, got {ts!r}")
    kind = f("optimizer", *_one_of(*HYPER))
    hyper = f("hyper", lambda v: isinstance(v, dict), "a JSON object")
    for k in HYPER[kind]:
        f(k, _is_number, "a number", d=hyper, w="train_step.hyper")
    clip = f("clip", lambda v: v is None or _one_of("norm", "value")[0](v),
             "null, 'norm' or 'value'")
    if clip is not None:
        f("clip_limit", _is_number, "a number")
    f("state_clip", lambda v: v is None or _is_number(v), "a number or null")
    f("on_nonfinite", lambda v: isinstance(v, str), "a str")
    f("steps", lambda v: _is_int(v) and 0 <= v < 2 ** 62, "an int >= 0")
    if "opt_state" not in ar.names:
        ar.fail("opt_state", "missing (a checkpoint with a train_step holds the "
                "optimizer's moments)")
    shape, dt = ar.header("opt_state")
    want = (2, n_params(spec))
    if tuple(shape) != want or dt.kind != "f":
        ar.fail("opt_state", f"expected shape {want} (the model's parameters), the file "
                f"holds {tuple(shape)} {dt}")


def _resolve_path(path):
    path = os.fspath(path)
    if os.path.isdir(path):
        ck = os.path.join(path, RUN_CHECKPOINT)
        if not os.path.isfile(ck):
            raise FileNotFoundError(f"{path}: a directory without {RUN_CHECKPOINT} "
                                    "(not a run directory)")
        return ck
    return path


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


_IN_FLIGHT = set()              # this process's temporary files being written
_IN_FLIGHT_LOCK = threading.Lock()


def _temp_pattern(base):
    """This target's temporary files: ours (.<base>.<pid>-<8 hex>.tmp) and the
    mkstemp names of earlier versions (.<base>.<8 chars>.tmp)."""
    return re.compile(r"\." + re.escape(base) + r"\.(?:(\d+)-[0-9a-f]{8}|[a-z0-9_]{8})\.tmp")


def _pid_alive(pid):
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:             # exists but not ours (EPERM), or cannot tell
        return True
    return True


def _clear_stale(d, base):
    """Remove the temporary files of saves to `base` that can no longer finish:
    those of a process that is gone, of this process when not in flight, and
    the old mkstemp names. Other files are never touched."""
    pattern = _temp_pattern(base)
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        full = os.path.join(d, name)
        if m.group(1) is not None:
            pid = int(m.group(1))
            with _IN_FLIGHT_LOCK:
                if full in _IN_FLIGHT:
                    continue
            if pid != os.getpid() and _pid_alive(pid):
                continue
        try:
            os.unlink(full)
        except OSError:
            pass


def _create_temp(d, base, mode):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(d, f".{base}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)     # the umask applies, as to any new file
        except FileExistsError:
            continue
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.add(tmp)
        if mode is not None:
            try:
                os.chmod(tmp, mode)
            except OSError:
                pass
        return fd, tmp


def atomic_write(path, write):
    """Call write(f) on a temporary file beside `path`, fsync it, then rename
    it over `path`. On any error the temporary file is removed and `path` is
    left as it was. The new file gets the mode an ordinary write would give:
    the existing file's, else 0o666 less the umask. Stale temporary files of
    earlier saves to `path` (a killed process's) are removed first."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    _clear_stale(d, base)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = None
    fd, tmp = _create_temp(d, base, mode)
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
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(tmp)
    _fsync_dir(d)


# -- public ----------------------------------------------------------------

def save(path, model, step=None, *, train_step=None, extra=None):
    """Write a checkpoint of `model` to `path`, atomically.

    step: the training step it was taken at (an int, or None).
    train_step: an fr.TrainStep of this model: its optimizer, clipping,
    moments and update count are saved too, and ``load`` rebuilds it.
    extra: a dict of anything else to restore (str keys; values: numbers,
    str, None, arrays, lists, tuples, dicts, numpy Generators on PCG64,
    PCG64DXSM, Philox, SFC64 or MT19937 -- a Generator comes back in the same
    state).
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

    path: the file, or a run directory (``fastrnn train --out DIR``): its
    checkpoint.npz. backend: None uses the saved model's backend when it is
    available here (else "auto"); a name forces one.

    Raises FileNotFoundError when there is no such file (or the directory has
    no checkpoint.npz), and ValueError naming the file (and the field) when
    it is not a valid fastrnn checkpoint: another kind of file, a damaged or
    truncated archive, or metadata that does not match the stored arrays.
    """
    path = _resolve_path(path)
    ar = _Archive(path)
    try:
        meta = _read_meta(ar)
        spec = _check_model(ar, meta)
        if "train_step" in meta:
            _check_train_step(ar, meta, spec)
        if "extra" not in meta:
            ar.fail("extra", "missing (expected a JSON object)")
        try:
            extra = _decode(meta["extra"], ar, "extra")
        except RecursionError:
            ar.fail("extra", "nested too deeply")
        if not isinstance(extra, dict):
            ar.fail("extra", f"expected a JSON object, got {type(extra).__name__}")
        params = {k: ar.array("param/" + k) for k in spec.layout}
        try:
            model = _build_model(meta["model"], backend)
            model.load_state_dict(params)
        except (ValueError, TypeError, OverflowError) as e:
            ar.fail("model", str(e))
        ts = None
        if "train_step" in meta:
            opt_state = ar.array("opt_state")
            try:
                ts = _build_train_step(model, meta["train_step"], opt_state)
            except (ValueError, TypeError, OverflowError) as e:
                ar.fail("train_step", str(e))
    finally:
        ar.close()
    return Checkpoint(model=model, step=meta["step"], train_step=ts, extra=extra,
                      meta=meta)
