"""The configuration of a training run, shared by `train` and `compare`: the
defaults and each task's presets, merging the options given on the command
line (and checking what a resumed run may change), building the task, the
model and its TrainStep from a configuration, and the one-line description
of a configuration.
"""
import math
import os
import time

import numpy as np

from .. import tasks as _tasks
from .errors import UsageError


DEFAULTS = dict(task="adding", T=None, cell="lstm", nonlinearity="tanh", init="default",
                hidden=32, layers=1, bidirectional=False, batch=32, steps=4000,
                forget_bias=None, optimizer="adam", lr=1e-2, momentum=0.0,
                clip_norm=1.0, clip_value=None,
                state_clip=None, backend="auto", dtype="float32", seed=0,
                eval_every=250, checkpoint_every=None, test_size=None,
                stop_when_solved=True, text=None)


# where a task needs other defaults than the adding problem's
TASK_DEFAULTS = {
    "temporal-order": dict(forget_bias=3.0, steps=6000),
    "memorization": dict(forget_bias=3.0, hidden=64, steps=10000),
    "char": dict(hidden=128, lr=3e-3, steps=2000, eval_every=200, clip_norm=5.0,
                 stop_when_solved=False),
}


OPTIMIZER_NAMES = {"adam": "Adam", "sgd": "SGD", "adagrad": "Adagrad"}


# options that may be given again with --resume (everything else is the run's)
RESUME_OVERRIDES = ("steps", "eval_every", "checkpoint_every", "stop_when_solved")


def resolve_config(ns, base=None):
    """The full configuration of a training run: `base` (a saved run's, or the
    defaults with the task's own), updated by the options given in `ns`."""
    given = {k: getattr(ns, k) for k in DEFAULTS if getattr(ns, k, None) is not None}
    no_clip = getattr(ns, "no_clip", False)
    if "task" in given:
        try:
            given["task"] = _tasks.task_name(given["task"])
        except ValueError as e:
            raise UsageError(str(e)) from None
    if base is not None:
        changed = sorted(k for k, v in given.items()
                         if k not in RESUME_OVERRIDES and v != base.get(k)
                         and not (k == "text" and _same_file(v, base.get(k))))
        if changed or no_clip:
            opts = ", ".join("--" + k.replace("_", "-") for k in changed or ["no_clip"])
            raise UsageError(f"{opts}: a resumed run keeps its configuration; only "
                             f"--steps, --eval-every, --checkpoint-every and "
                             f"--stop/--no-stop may be given with --resume")
        cfg = dict(base)
        cfg.update({k: v for k, v in given.items() if k in RESUME_OVERRIDES})
        return _check_config(cfg)
    task = given.get("task", DEFAULTS["task"])
    cfg = dict(DEFAULTS)
    cfg.update(TASK_DEFAULTS.get(task, {}))
    if "clip_value" in given and "clip_norm" not in given:
        cfg["clip_norm"] = None
    if "clip_value" in given and "clip_norm" in given:
        raise UsageError("--clip-norm, --clip-value: give one of them, not both")
    cfg.update(given)
    cfg["task"] = task
    if no_clip:
        if "clip_norm" in given or "clip_value" in given:
            raise UsageError("--no-clip: not together with --clip-norm/--clip-value")
        cfg["clip_norm"] = cfg["clip_value"] = None
    if cfg["T"] is None:
        cfg["T"] = _tasks.TASKS[task].default_T
    if cfg["cell"] != "rnn" and "nonlinearity" in given and given["nonlinearity"] != "tanh":
        raise UsageError(f"--nonlinearity: applies to --cell rnn (the "
                         f"{cfg['cell'].upper()}'s is fixed)")
    if cfg["cell"] != "lstm":
        if "forget_bias" in given:
            raise UsageError("--forget-bias: applies to --cell lstm")
        cfg["forget_bias"] = None
    if cfg["text"] is not None:
        cfg["text"] = os.path.abspath(cfg["text"])
    return _check_config(cfg)


def _same_file(a, b):
    return a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)


def _check_config(cfg):
    for k in ("hidden", "layers", "T", "batch", "steps", "eval_every"):
        if cfg[k] < 1:
            raise UsageError(f"--{k.replace('_', '-')}: expected an integer >= 1, "
                             f"got {cfg[k]}")
    if cfg["test_size"] is not None and cfg["test_size"] < 1:
        raise UsageError(f"--test-size: expected an integer >= 1, got {cfg['test_size']}")
    dtype = np.dtype(cfg["dtype"])
    big = float(np.finfo(dtype).max)
    for k in ("lr", "clip_norm", "clip_value", "state_clip"):
        v = cfg[k]
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UsageError(f"--{k.replace('_', '-')}: expected a number > 0, got {v}")
        if v is not None and v > big:
            raise UsageError(f"--{k.replace('_', '-')}: {v:g} is not finite in "
                             f"{dtype.name} (largest {big:.3g})")
    if not (math.isfinite(cfg["momentum"]) and cfg["momentum"] >= 0):
        raise UsageError(f"--momentum: expected a number >= 0, got {cfg['momentum']}")
    fb = cfg["forget_bias"]
    if fb is not None and not (math.isfinite(fb) and abs(fb) <= big):
        raise UsageError(f"--forget-bias: expected a finite number, got {fb}")
    if cfg["seed"] < 0:
        raise UsageError(f"--seed: expected an integer >= 0, got {cfg['seed']}")
    if cfg["cell"] != "rnn" and cfg["init"] == "identity":
        raise UsageError("--init identity: the identity init (IRNN) is for --cell rnn")
    if cfg["task"] == "char":
        if cfg["text"] is None:
            raise UsageError("--text: the char task needs a text file (--text FILE)")
        if not os.path.isfile(cfg["text"]):
            raise UsageError(f"--text: no such file: {cfg['text']}")
        if cfg["bidirectional"]:
            raise UsageError("--bidirectional: a language model must not see the "
                             "characters it predicts")
    if cfg["checkpoint_every"] is not None and cfg["checkpoint_every"] < 1:
        raise UsageError(f"--checkpoint-every: expected an integer >= 1, "
                         f"got {cfg['checkpoint_every']}")
    return cfg


def make_task(cfg):
    try:
        return _tasks.make_task(cfg["task"], cfg["T"], text=cfg["text"])
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(str(e)) from None


def build(cfg, task):
    """The model and its TrainStep for a configuration."""
    import fastrnn as fr
    kw = dict(num_layers=cfg["layers"], bidirectional=cfg["bidirectional"],
              dtype=np.dtype(cfg["dtype"]), init=cfg["init"], seed=cfg["seed"],
              backend=cfg["backend"])
    try:
        if cfg["cell"] == "lstm":
            core = fr.LSTM(task.input_size, cfg["hidden"], **kw)
        elif cfg["cell"] == "gru":
            core = fr.GRU(task.input_size, cfg["hidden"], **kw)
        else:
            core = fr.RNN(task.input_size, cfg["hidden"], nonlinearity=cfg["nonlinearity"],
                          **kw)
        model = fr.SequenceModel(core, task.output_size, loss=task.loss,
                                 readout=task.readout)
        if cfg["forget_bias"] is not None:
            set_forget_bias(model, cfg["forget_bias"])
        opt = {"sgd": lambda: fr.SGD(cfg["lr"], momentum=cfg["momentum"]),
               "adam": lambda: fr.Adam(cfg["lr"]),
               "adagrad": lambda: fr.Adagrad(cfg["lr"])}[cfg["optimizer"]]()
        clip = None
        if cfg["clip_norm"] is not None:
            clip = fr.ClipNorm(cfg["clip_norm"])
        elif cfg["clip_value"] is not None:
            clip = fr.ClipValue(cfg["clip_value"])
        step = fr.TrainStep(model, opt, clip=clip, state_clip=cfg["state_clip"])
    except RuntimeError as e:           # the backend is not available here
        raise UsageError(f"--backend {cfg['backend']}: {e}") from None
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    return model, step


def set_forget_bias(model, value):
    """Set the LSTM's forget-gate bias to `value` in every layer and direction:
    the f block of bias_ih = value, of bias_hh = 0 (Gers et al. 2000;
    Jozefowicz et al. 2015). A large value keeps the cell's memory, and the
    gradient through it, from decaying at the start of training."""
    H = model.core.hidden_size
    sd = model.state_dict()
    for k in sd:
        if k.startswith("bias_ih_l"):
            sd[k][H:2 * H] = value
        elif k.startswith("bias_hh_l"):
            sd[k][H:2 * H] = 0.0
    model.load_state_dict(sd)


def describe(cfg, model=None):
    """One line: the model and how it is trained."""
    cell = cfg["cell"].upper() if cfg["cell"] != "rnn" else f"{cfg['nonlinearity']} RNN"
    arch = f"{cell} H={cfg['hidden']}"
    if cfg["layers"] > 1:
        arch += f" x{cfg['layers']} layers"
    if cfg["bidirectional"]:
        arch += " bidirectional"
    arch += f", {cfg['init']} init"
    if cfg.get("forget_bias") is not None:
        arch += f", forget bias {cfg['forget_bias']:g}"
    opt = f"{OPTIMIZER_NAMES[cfg['optimizer']]} lr={cfg['lr']:g}"
    if cfg["optimizer"] == "sgd" and cfg["momentum"]:
        opt += f" momentum={cfg['momentum']:g}"
    clips = []
    if cfg["clip_norm"] is not None:
        clips.append(f"clip-norm {cfg['clip_norm']:g}")
    if cfg["clip_value"] is not None:
        clips.append(f"clip-value {cfg['clip_value']:g}")
    if cfg["state_clip"] is not None:
        clips.append(f"state-clip {cfg['state_clip']:g}")
    backend = model.backend if model is not None else cfg["backend"]
    if backend == "auto":
        from ..backends import resolve
        try:
            backend = resolve("auto", None if cfg["cell"] == "rnn" else cfg["cell"])
        except RuntimeError:
            pass
    return (f"{arch} | {opt}, {', '.join(clips) or 'no clipping'} | batch {cfg['batch']}, "
            f"seed {cfg['seed']} | {backend} {cfg['dtype']}")


def default_out(cfg, root="runs", tag=None):
    """runs/<task>-T<T>-<tag>-<date>-<time> (tag: the cell), never an existing one."""
    if tag is None:
        tag = cfg["cell"] if cfg["cell"] != "rnn" else f"rnn-{cfg['nonlinearity']}"
    name = f"{cfg['task']}-T{cfg['T']}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = os.path.join(root, name), 1
    while os.path.exists(out):
        n += 1
        out = os.path.join(root, f"{name}-{n}")
    return out
