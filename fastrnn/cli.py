"""The fastrnn command line (also: python -m fastrnn).

  fastrnn train      train one model on a task; with no options: an LSTM with
                     gradient norm clipping on the adding problem, T=100
  fastrnn compare    tanh RNN / tanh RNN + orthogonal init + clipping / IRNN /
                     LSTM on one task, one budget, one seed: table and plot
  fastrnn sample     generate text from a character-model checkpoint
  fastrnn bench      a quick speed table: each backend, the NumPy reference,
                     PyTorch (when installed)
  fastrnn backends   which backends are available, and why not
  fastrnn plot       (re)draw the picture of a run directory
  fastrnn tune       plan the numba backend's kernels for this machine
"""
import argparse
import errno
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time

import numpy as np

from . import cli_mpi as _mpi
from . import tasks as _tasks
from .checkpoint import RUN_CHECKPOINT

CHECKPOINT = RUN_CHECKPOINT
COMPILE_NOTICE_S = 2.0   # the first calls taking longer: say that kernels compile
METRICS = "metrics.jsonl"
PICTURE = "training.png"


class UsageError(Exception):
    """A bad combination of options: reported as `fastrnn CMD: error: ...`, exit 2."""


class RunError(Exception):
    """A run that cannot go on (every step skipped, ...): reported as
    `fastrnn CMD: error: ...`, exit 1 (as are filesystem errors)."""


# a run stops with an error after this many skipped steps in a row (or when
# every step of a shorter run was skipped): its parameters no longer change
STOP_AFTER_SKIPPED = 100
# a log window with at least this fraction of skipped steps warns (once a run)
WARN_SKIPPED_FRACTION = 0.1


# ---------------------------------------------------------------------------
# configuration: defaults, per-task defaults, options given on the command line
# ---------------------------------------------------------------------------

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
        from .backends import resolve
        try:
            backend = resolve("auto", None if cfg["cell"] == "rnn" else cfg["cell"])
        except RuntimeError:
            pass
    return (f"{arch} | {opt}, {', '.join(clips) or 'no clipping'} | batch {cfg['batch']}, "
            f"seed {cfg['seed']} | {backend} {cfg['dtype']}")


# ---------------------------------------------------------------------------
# progress: tqdm or rich bar on a terminal (a built-in one without them),
# plain log lines otherwise
# ---------------------------------------------------------------------------

class _LogLines:
    """Not a terminal: no bar; the log lines only."""

    def __init__(self, total, initial, desc, stream):
        self.stream = stream

    def update(self, i, stats):
        pass

    def write(self, line):
        print(line, file=self.stream, flush=True)

    def close(self):
        pass


class _TextBar(_LogLines):
    """A minimal built-in progress bar (when neither tqdm nor rich imports)."""

    def __init__(self, total, initial, desc, stream):
        super().__init__(total, initial, desc, stream)
        self.total, self.desc, self.last, self.line = total, desc, 0.0, ""

    def update(self, i, stats):
        now = time.perf_counter()
        if now - self.last < 0.1 and i < self.total:
            return
        self.last = now
        width = shutil.get_terminal_size((100, 20)).columns
        frac = i / self.total
        n = 20
        bar = "#" * int(frac * n) + "-" * (n - int(frac * n))
        line = f"{self.desc} [{bar}] {i}/{self.total} {stats}"[:width - 1]
        self.stream.write("\r" + line.ljust(len(self.line)))
        self.stream.flush()
        self.line = line

    def write(self, line):
        self.stream.write("\r" + " " * len(self.line) + "\r" + line + "\n")
        self.stream.write(self.line)
        self.stream.flush()

    def close(self):
        if self.line:
            self.stream.write("\n")
            self.stream.flush()


class _TqdmBar(_LogLines):
    def __init__(self, total, initial, desc, stream):
        from tqdm import tqdm
        self.stream = stream
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                        dynamic_ncols=True, file=stream, leave=True)
        self.last = 0.0

    def update(self, i, stats):
        self.bar.update(i - self.bar.n)
        now = time.perf_counter()
        if now - self.last >= 0.1:
            self.last = now
            self.bar.set_postfix_str(stats, refresh=False)

    def write(self, line):
        self.bar.write(line, file=self.stream)

    def close(self):
        self.bar.close()


class _RichBar(_LogLines):
    def __init__(self, total, initial, desc, stream):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[stats]}"),
                                 console=Console(file=stream))
        self.progress.start()
        self.task = self.progress.add_task(desc, total=total, completed=initial, stats="")

    def update(self, i, stats):
        self.progress.update(self.task, completed=i, stats=stats)

    def write(self, line):
        self.progress.console.print(line, markup=False, highlight=False)

    def close(self):
        self.progress.stop()


def make_progress(kind, total, initial, desc, stream=None):
    """kind: "auto" (a bar on a terminal, log lines otherwise), "bar", "log", "none"."""
    stream = sys.stdout if stream is None else stream
    if kind == "none":
        return _Quiet(total, initial, desc, stream)
    if kind == "log" or (kind == "auto" and not _isatty(stream)):
        return _LogLines(total, initial, desc, stream)
    for cls, module in ((_TqdmBar, "tqdm"), (_RichBar, "rich")):
        try:
            __import__(module)
        except ImportError:
            continue
        return cls(total, initial, desc, stream)
    return _TextBar(total, initial, desc, stream)


class _Quiet(_LogLines):
    def write(self, line):
        pass


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------

def _num(v):
    """JSON-safe float (non-finite values become null)."""
    v = float(v)
    return v if math.isfinite(v) else None


def read_records(path):
    """[(line, record)] of a metrics.jsonl file. An incomplete last line (a
    crash in the middle of writing it) is dropped; any other line that is not
    a JSON object is a UsageError naming the file and the line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if not isinstance(r, dict):
            if n == len(lines):
                break
            raise UsageError(f"{path}: line {n} is not a JSON record (a damaged file)")
        out.append((line if line.endswith("\n") else line + "\n", r))
    return out


def read_metrics(run_dir):
    """The records of a run's metrics.jsonl, grouped: config (dict), steps
    (dict of arrays: step, loss, grad_norm, clipped, skipped), evals (step,
    metric arrays) and flows (list of (step, norms))."""
    path = os.path.join(run_dir, METRICS)
    steps, evals, flows, config = [], [], [], {}
    for _, r in read_records(path):
        t = r.get("type")
        if t == "step":
            steps.append((r["step"], r["loss"], r["grad_norm"], r["clipped"],
                          r["skipped"]))
        elif t == "eval":
            evals.append((r["step"], r["metric"]))
        elif t == "flow":
            flows.append((r["step"], np.array(r["norms"], dtype=float)))
        elif t == "config":
            config = r
    a = np.array(steps, dtype=float).reshape(-1, 5)
    e = np.array(evals, dtype=float).reshape(-1, 2)
    return {"config": config,
            "steps": {"step": a[:, 0], "loss": a[:, 1],
                      "grad_norm": a[:, 2], "clipped": a[:, 3], "skipped": a[:, 4]},
            "evals": {"step": e[:, 0], "metric": e[:, 1]},
            "flows": flows}


def _truncate_metrics(path, step):
    """Keep the records up to `step` (a resumed run repeats what came after;
    an incomplete last line is dropped)."""
    from .checkpoint import atomic_write
    if not os.path.exists(path):
        return
    keep = [line for line, r in read_records(path)
            if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    atomic_write(path, lambda f: f.write("".join(keep).encode()))


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

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


def _metric_str(task, m):
    if m is None or not math.isfinite(m):
        return f"{task.metric_name} n/a"
    return f"{task.metric_name} {m:.5f}" if task.metric_name == "test MSE" else \
        f"{task.metric_name} {m:.4f}"


def _make_dirs(path):
    """os.makedirs(path), returning the directories it created, deepest first
    (so that a run that fails before its first step can remove them)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(errno.ENOTDIR, "exists and is not a directory", path)
    created, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        created.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    os.makedirs(path, exist_ok=True)
    return created


def _remove_dirs(created):
    """Remove the directories _make_dirs created, where they are empty."""
    for d in created:
        try:
            os.rmdir(d)
        except OSError:
            return


def gradient_flow_record(metrics, model, flow_x, flow_y, step):
    """Write the gradient flow on the fixed batch (fr.gradient_flow) to metrics."""
    from .model import gradient_flow
    norms = gradient_flow(model, flow_x, flow_y)
    metrics.write(json.dumps({"type": "flow", "step": step,
                              "norms": [_num(v) for v in norms]}) + "\n")


def _warn(line):
    print(f"warning: {line}", file=sys.stderr, flush=True)


# what a resumed run's model must have from its configuration and task
def _model_mismatch(model, cfg, task):
    """The first difference between a checkpoint's model and the run's
    configuration, as text; None when they match."""
    core = model.core
    cell = {"LSTM": "lstm", "GRU": "gru"}.get(type(core).__name__, "rnn")
    pairs = [("cell", cell, cfg["cell"]), ("hidden", core.hidden_size, cfg["hidden"]),
             ("layers", core.num_layers, cfg["layers"]),
             ("bidirectional", bool(core.bidirectional), bool(cfg["bidirectional"])),
             ("dtype", np.dtype(core.dtype).name, cfg["dtype"]),
             ("input size", core.input_size, task.input_size),
             ("output size", model.output_size, task.output_size),
             ("loss", model.loss, task.loss), ("readout", model.readout, task.readout)]
    if cell == "rnn":
        pairs.append(("nonlinearity", core.nonlinearity, cfg["nonlinearity"]))
    for name, got, want in pairs:
        if got != want:
            return f"{name} {got!r} (the configuration's: {want!r})"
    return None


def _check_resume(checkpoint, cfg, task, mpath):
    """Refuse a checkpoint that cannot continue the run in this directory: no
    training state, a model other than its configuration's, or a run other
    than the one metrics.jsonl records (a checkpoint copied from elsewhere)."""
    ex, ts = checkpoint.extra, checkpoint.train_step
    if (ts is None or not isinstance(ex.get("rng"), np.random.Generator)
            or not isinstance(ex.get("counters"), dict)
            or not isinstance(checkpoint.step, int) or checkpoint.step < 0):
        raise UsageError("--resume: the checkpoint has no training state")
    bad = _model_mismatch(checkpoint.model, cfg, task)
    if bad:
        raise UsageError(f"--resume: the checkpoint's model does not match its "
                         f"configuration: {bad}")
    if task.stateful and ex.get("text_sha256") != task.sha256:
        raise UsageError(f"--resume: {cfg['text']} is not the text the run was "
                         "trained on (its contents changed)")
    if not os.path.exists(mpath):
        return
    rec = next((r for _, r in read_records(mpath) if r.get("type") == "config"), None)
    if rec is None:
        return
    diff = [k for k in DEFAULTS
            if k in rec and k not in RESUME_OVERRIDES and rec[k] != cfg.get(k)]
    if diff:
        what = ", ".join(f"{k.replace('_', '-')} {cfg.get(k)!r} (the directory's run: "
                         f"{rec.get(k)!r})" for k in diff)
        raise UsageError(f"--resume: the checkpoint is from another run than "
                         f"{mpath}: {what}")


def train_run(cfg, out, *, checkpoint=None, progress="auto", title=None, stream=None,
              plot=True):
    """Train one model as configured; write metrics.jsonl, checkpoint.npz and the
    picture into `out`. `checkpoint`: a loaded fr.Checkpoint to resume from.
    Returns the summary dict. Everything that can be checked is checked before
    `out` is created; a run that fails before its first step removes the
    directories it created."""
    stream = sys.stdout if stream is None else stream
    task = make_task(cfg)
    if task.stateful:
        try:
            task.windows_per_epoch(cfg["batch"])
        except ValueError as e:
            raise UsageError(str(e)) from None
    mpath = os.path.join(out, METRICS)
    if checkpoint is None:
        model, ts = build(cfg, task)
    else:
        _check_resume(checkpoint, cfg, task, mpath)
        model, ts = checkpoint.model, checkpoint.train_step
    test = task.test_set(cfg["seed"], cfg["test_size"])
    flow_batch = task.flow_batch(cfg["seed"])
    state = dict(i=0 if checkpoint is None else int(checkpoint.step), saved=False,
                 metrics=None)
    created = _make_dirs(out)
    try:
        return _train_loop(cfg, out, task, model, ts, checkpoint, test, flow_batch,
                           state, progress, title, stream, plot)
    except BaseException as e:
        if isinstance(e, OSError) and e.filename is None:
            e.filename = out
        if state["metrics"] is not None:
            state["metrics"].close()
        if checkpoint is None and state["i"] == 0 and not state["saved"] and created:
            try:
                os.unlink(mpath)
            except OSError:
                pass
            _remove_dirs(created)
        raise


def _train_loop(cfg, out, task, model, ts, checkpoint, test, flow_batch, state,
                progress, title, stream, plot):
    from . import checkpoint as ckmod
    say = lambda s: print(s, file=stream, flush=True)  # noqa: E731
    mpath, cpath = os.path.join(out, METRICS), os.path.join(out, CHECKPOINT)
    if checkpoint is None:
        rng = np.random.default_rng(cfg["seed"])
        start, carry, metric = 0, None, None
        counters = dict(clipped=0, skipped=0, max_grad_norm=0.0, seconds=0.0,
                        solved_at=None)
        metrics = state["metrics"] = open(mpath, "w")
        metrics.write(json.dumps({"type": "config", **cfg}) + "\n")
    else:
        ex = checkpoint.extra
        rng, start, carry = ex["rng"], int(checkpoint.step), ex.get("hx")
        metric, counters = ex.get("metric"), dict(ex["counters"])
        new_file = not os.path.exists(mpath)
        _truncate_metrics(mpath, start)
        metrics = state["metrics"] = open(mpath, "a")
        if new_file:
            metrics.write(json.dumps({"type": "config", **cfg}) + "\n")
    counters.setdefault("skip_streak", 0)
    par = _mpi.active()      # None unless under mpiexec (fastrnn/cli_mpi.py)
    if par is not None:
        ts, carry = par.attach(ts, cfg), par.local_state(carry)
    steps, B = cfg["steps"], cfg["batch"]
    ck_every = cfg["checkpoint_every"] or cfg["eval_every"]
    clip_limit = cfg["clip_norm"]
    stop_after = min(STOP_AFTER_SKIPPED, steps)

    def save(i):
        metrics.flush()
        os.fsync(metrics.fileno())
        extra = {"config": cfg, "rng": rng, "counters": counters, "metric": metric,
                 "task": task.name}
        if task.stateful:
            extra["hx"] = carry if par is None else par.global_state(carry)
            extra["text_sha256"] = task.sha256
        if task.name == "char":
            extra["vocab"] = task.vocab
        try:
            ckmod.save(cpath, model, i, train_step=ts, extra=extra)
        except OSError as e:
            if e.filename is None:
                e.filename = cpath
            raise
        state["saved"] = True

    # the first compiled calls of a process compile the kernels (first run
    # after install: about a minute) or load them from Numba's cache
    t_warm = time.perf_counter()
    notice = threading.Timer(COMPILE_NOTICE_S, say,
                             ["compiling kernels (one time, about a minute) ..."])
    notice.daemon = True
    notice.start()
    try:
        if start == 0:
            gradient_flow_record(metrics, model, *flow_batch, 0)
    except BaseException:
        notice.cancel()
        raise
    desc = title or task.name
    bar = make_progress(progress, steps, start, desc, stream)
    t0 = time.perf_counter()
    sec0 = counters["seconds"]
    win = dict(n=0, loss=0.0, grad=0.0, clipped=0, skipped=0, t=t0)  # since the last log
    rate = dict(t=t0, i=start, v=0.0)                         # steps/s for the bar
    recent = []                                               # for the bar's loss
    i = start
    lines = []
    stopped = False
    warned = False
    interrupted = []
    old_handler = _on_sigint(interrupted) if par is None else None
    try:
        while i < steps and not interrupted:
            x, y, reset = task.train_batch(rng, B, i)
            if par is not None:
                x, y = par.local_batch(task, x, y)
            r = ts(x, y, hx=None if reset else carry)
            if notice is not None:    # training time starts after the first step
                notice.cancel()
                notice = None
                now = time.perf_counter()
                warm_s = now - t_warm
                sec0 -= now - t0
            i += 1
            state["i"] = i
            if task.stateful:
                carry = None if r.skipped else (tuple(np.array(a) for a in r.hx)
                                                if isinstance(r.hx, tuple) else np.array(r.hx))
            g = float(r.grad_norm)
            counters["clipped"] += int(r.clipped)
            counters["skipped"] += int(r.skipped)
            counters["skip_streak"] = counters["skip_streak"] + 1 if r.skipped else 0
            if math.isfinite(g):
                counters["max_grad_norm"] = max(counters["max_grad_norm"], g)
            lines.append(f'{{"type": "step", "step": {i}, "loss": {_jf(r.loss)}, '
                         f'"grad_norm": {_jf(g)}, "clipped": {int(r.clipped)}, '
                         f'"skipped": {int(r.skipped)}}}\n')
            if counters["skip_streak"] >= stop_after:
                metrics.writelines(lines)
                metrics.close()
                n = counters["skip_streak"]
                what = (f"all {n} steps were skipped" if n == i else
                        f"{n} steps in a row were skipped (steps {i - n + 1}-{i})")
                raise RunError(f"{what}: the loss or the gradient is not finite, so the "
                               "parameters no longer change; try a smaller --lr, "
                               "gradient clipping (--clip-norm) or check the data")
            win["n"] += 1
            win["clipped"] += int(r.clipped)
            win["skipped"] += int(r.skipped)
            if math.isfinite(r.loss):
                win["loss"] += r.loss
                recent.append(r.loss)
            if math.isfinite(g):
                win["grad"] += g
            if len(recent) > 50:
                del recent[:25]
            now = time.perf_counter()
            if now - rate["t"] >= 0.5:
                rate.update(v=(i - rate["i"]) / (now - rate["t"]), t=now, i=i)
            bar.update(i, f"loss {np.mean(recent) if recent else float('nan'):.4f} | "
                          f"grad {g:.3g} | clipped {counters['clipped'] / i:.1%} | "
                          f"{rate['v']:.0f} steps/s")
            if i % cfg["eval_every"] == 0 or i == steps:
                metrics.writelines(lines)
                lines = []
                metric = float(task.evaluate(model, test))
                counters["seconds"] = sec0 + time.perf_counter() - t0
                solved = task.solved(metric)
                if solved and counters["solved_at"] is None:
                    counters["solved_at"] = i
                metrics.write(json.dumps({"type": "eval", "step": i, "metric": _num(metric),
                                          "seconds": round(counters["seconds"], 3)}) + "\n")
                n = max(win["n"], 1)
                bar.write(f"step {i:>6}/{steps}  loss {win['loss'] / n:.4f}  "
                          f"grad {win['grad'] / n:.3g} (max {counters['max_grad_norm']:.3g})  "
                          f"clipped {win['clipped'] / n:5.1%}  {_metric_str(task, metric)}  "
                          f"{n / max(time.perf_counter() - win['t'], 1e-9):.0f} steps/s")
                if not warned and win["skipped"] and \
                        win["skipped"] >= WARN_SKIPPED_FRACTION * n:
                    warned = True
                    _warn(f"{win['skipped']} of the last {win['n']} steps were skipped "
                          "(non-finite loss or gradient); a smaller --lr or gradient "
                          "clipping may help")
                win = dict(n=0, loss=0.0, grad=0.0, clipped=0, skipped=0,
                           t=time.perf_counter())
                rate.update(t=win["t"], i=i)
                if solved and cfg["stop_when_solved"]:
                    stopped = True
                    break
                if i % ck_every == 0 or i == steps:
                    save(i)
            elif i % ck_every == 0:
                metrics.writelines(lines)
                lines = []
                counters["seconds"] = sec0 + time.perf_counter() - t0
                save(i)
    finally:
        if notice is not None:
            notice.cancel()
        _restore_sigint(old_handler)
        bar.close()
    metrics.writelines(lines)
    counters["seconds"] = sec0 + time.perf_counter() - t0
    if interrupted:
        save(i)
        metrics.close()
        say(f"interrupted at step {i}; checkpoint saved. Continue with:\n"
            f"  fastrnn train --resume {out}")
        raise SystemExit(130)
    if metric is None:  # resumed at or past the end: measure once
        metric = float(task.evaluate(model, test))
    gradient_flow_record(metrics, model, *flow_batch, i)
    save(i)
    metrics.close()
    seconds = counters["seconds"]
    if notice is not None:      # no step ran in this process
        warm_s = 0.0
    summary = dict(task=task.name, T=cfg["T"], cell=cfg["cell"],
                   nonlinearity=cfg["nonlinearity"] if cfg["cell"] == "rnn" else None,
                   init=cfg["init"], hidden=cfg["hidden"], steps=i,
                   seconds=round(seconds, 2), steps_per_s=round(i / max(seconds, 1e-9), 1),
                   startup_seconds=round(warm_s, 2),
                   metric_name=task.metric_name, test_metric=metric,
                   baseline=task.baseline, threshold=task.threshold,
                   solved=task.solved(metric), solved_at=counters["solved_at"],
                   stopped_when_solved=stopped,
                   max_grad_norm=counters["max_grad_norm"], clip_norm=clip_limit,
                   clipped=counters["clipped"], skipped=counters["skipped"], out=out)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if plot and (par is None or par.root):
        summary["picture"] = plot_run(out, say)
    return summary


def _on_sigint(flag):
    """Ctrl-C during training: finish the current step, then save and stop
    (a second Ctrl-C stops at once). Returns the previous handler."""
    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(True)
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:          # not the main thread: leave signals alone
        return None


def _restore_sigint(old):
    if old is not None:
        signal.signal(signal.SIGINT, old)


def _jf(v):
    v = float(v)
    return repr(v) if math.isfinite(v) else "null"


def print_summary(s, say):
    base = s["baseline"]
    verdict = {True: "SOLVED", False: "not solved", None: ""}[s["solved"]]
    crit = []
    if base is not None:
        crit.append(f"baseline {base:.4g}")
    if s["threshold"] is not None:
        crit.append(f"solved below {s['threshold']:g}")
    m = s["test_metric"]
    say(f"done: {s['steps']} steps in {s['seconds']:.1f} s of training "
        f"({s['steps_per_s']:.0f} steps/s), after {s['startup_seconds']:.1f} s of "
        "compiling or loading the kernels (the first calls)")
    say(f"{s['metric_name']} {m:.5g}" + (f" ({', '.join(crit)})" if crit else "")
        + (f": {verdict}" if verdict else "")
        + (f" at step {s['solved_at']}" if s["solved"] and s["solved_at"] else ""))
    n = max(s["steps"], 1)
    say(f"gradient norm: largest {s['max_grad_norm']:.4g}; clipped {s['clipped']} of "
        f"{s['steps']} steps ({s['clipped'] / n:.1%}); skipped (non-finite) {s['skipped']}")
    files = [os.path.join(s["out"], f) for f in (METRICS, CHECKPOINT)]
    if s.get("picture"):
        files.append(s["picture"])
    say("wrote " + ", ".join(files))


def cmd_train(args):
    from . import checkpoint as ckmod
    if args.resume:
        path = args.resume
        ck_path = os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path
        if not os.path.isfile(ck_path):
            raise UsageError(f"--resume: no checkpoint at {ck_path}")
        try:
            ck = ckmod.load(ck_path)
        except ValueError as e:
            raise UsageError(f"--resume: {e}") from None
        base = ck.extra.get("config")
        if not (isinstance(base, dict) and all(k in base for k in DEFAULTS)):
            raise UsageError(f"--resume: {ck_path} was not written by `fastrnn train`")
        try:
            cfg = resolve_config(args, base=base)
        except (TypeError, ValueError, KeyError) as e:
            raise UsageError(f"--resume: {ck_path}: its configuration is damaged "
                             f"({e})") from None
        out = os.path.dirname(os.path.abspath(ck_path))
        if args.out and os.path.abspath(args.out) != out:
            raise UsageError("--out: a resumed run continues in its own directory")
    else:
        ck = None
        cfg = resolve_config(args)
        out = args.out or default_out(cfg)
        if os.path.exists(os.path.join(out, CHECKPOINT)):
            print(f"note: {out} holds a previous run; starting a new one there "
                  f"(use --resume {out} to continue it instead)", flush=True)
    task = make_task(cfg)
    say = lambda s: print(s, flush=True)  # noqa: E731
    head = "resuming" if ck else "fastrnn train"
    say(f"{head}: {task.describe()}, {cfg['steps']} steps"
        + (f" from step {ck.step}" if ck else "")
        + (" (stops when solved)" if cfg["stop_when_solved"] and task.threshold else ""))
    say(f"  {describe(cfg, ck.model if ck else None)}")
    say(f"  output: {out}")
    s = train_run(cfg, out, checkpoint=ck, progress=args.progress)
    print_summary(s, say)
    return 1 if args.require_solved and not s["solved"] else 0


# ---------------------------------------------------------------------------
# pictures (matplotlib, optional)
# ---------------------------------------------------------------------------

def _figure(*size):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=size, layout="constrained")


def _smooth(v, n):
    v = np.asarray(v, dtype=float)
    if v.size < 2 * n or n < 2:
        return v
    ok = np.isfinite(v)
    c = np.convolve(np.where(ok, v, 0.0), np.ones(n), "same")
    w = np.convolve(ok.astype(float), np.ones(n), "same")
    return c / np.maximum(w, 1)


NO_MATPLOTLIB = ("matplotlib is not installed: skipping the picture "
                 "(pip install 'fastrnn[plot]' to get it)")


def plot_run(run_dir, say=print):
    """Draw run_dir/training.png from its metrics.jsonl; returns the path, or
    None (and says so) without matplotlib."""
    fig = _figure(11, 7.5)
    if fig is None:
        say(NO_MATPLOTLIB)
        return None
    m = read_metrics(run_dir)
    cfg, st, ev = m["config"], m["steps"], m["evals"]
    axs = fig.subplots(2, 2)
    title = f"{cfg.get('task')} T={cfg.get('T')}: {describe(cfg) if cfg else ''}"
    fig.suptitle(title, fontsize=9)
    ax = axs[0, 0]
    ax.plot(st["step"], st["loss"], color="0.75", lw=0.5, label="per step")
    ax.plot(st["step"], _smooth(st["loss"], 25), color="C0", lw=1.2, label="moving average")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    ax.legend(fontsize=8)
    ax = axs[0, 1]
    task = _tasks.TASKS.get(cfg.get("task"))
    name = task.metric_name if task else "test metric"
    ax.plot(ev["step"], ev["metric"], "o-", color="C1", ms=3, label=name)
    _reference_lines(ax, task, cfg)
    ax.set(xlabel="step", ylabel=name, yscale="log", title=name)
    ax.legend(fontsize=8)
    ax = axs[1, 0]
    ax.plot(st["step"], st["grad_norm"], color="C2", lw=0.5, label="gradient norm")
    if cfg.get("clip_norm"):
        ax.axhline(cfg["clip_norm"], color="C3", ls="--", lw=1,
                   label=f"clip threshold {cfg['clip_norm']:g}")
    sk = st["skipped"] > 0
    if sk.any():
        ax.plot(st["step"][sk], np.ones(sk.sum()), "x", color="C3", label="skipped")
    ax.set(xlabel="step", ylabel="||dL/dθ|| before clipping", yscale="log",
           title="gradient norm per step")
    ax.legend(fontsize=8)
    ax = axs[1, 1]
    if m["flows"]:
        (s0, f0), (s1, f1) = m["flows"][0], m["flows"][-1]
        t = np.arange(1, f0.size + 1)
        ax.plot(t, f0, color="C0", label=f"step {s0}")
        if len(m["flows"]) > 1:
            ax.plot(t, f1, color="C3", label=f"step {s1}")
        ax.set(yscale="log")
        ax.legend(fontsize=8)
    ax.set(xlabel="time step t", ylabel="||dL/dh_t||",
           title="gradient flow (how much gradient reaches step t)")
    path = os.path.join(run_dir, PICTURE)
    fig.savefig(path, dpi=110)
    return path


def _reference_lines(ax, task, cfg):
    if task is None:
        return
    if task.baseline is not None and cfg.get("task") != "memorization":
        ax.axhline(task.baseline, color="0.5", ls=":", lw=1, label="trivial baseline")
    if task.threshold is not None:
        ax.axhline(task.threshold, color="C2", ls="--", lw=1, label="solved below")


def cmd_plot(args):
    say = lambda s: print(s, flush=True)  # noqa: E731
    if os.path.isfile(os.path.join(args.run, "compare.json")):
        with open(os.path.join(args.run, "compare.json")) as f:
            p = plot_compare(json.load(f), args.run, say)
    elif os.path.isfile(os.path.join(args.run, METRICS)):
        p = plot_run(args.run, say)
    else:
        raise UsageError(f"{args.run}: neither {METRICS} (a train run) nor compare.json "
                         "(a compare run) here")
    if p:
        say(f"wrote {p}")
    return 0


# ---------------------------------------------------------------------------
# compare: the vanishing/exploding gradient story on one task
# ---------------------------------------------------------------------------

VARIANTS = {
    "rnn": ("tanh RNN, default init, no clipping",
            dict(cell="rnn", nonlinearity="tanh", init="default", clip=False)),
    "rnn-orth-clip": ("tanh RNN, orthogonal init, clipping",
                      dict(cell="rnn", nonlinearity="tanh", init="orthogonal", clip=True)),
    "irnn": ("IRNN: relu, identity init, clipping",
             dict(cell="rnn", nonlinearity="relu", init="identity", clip=True)),
    "lstm": ("LSTM, default init, clipping",
             dict(cell="lstm", nonlinearity="tanh", init="default", clip=True)),
    "gru": ("GRU, default init, clipping",
            dict(cell="gru", nonlinearity="tanh", init="default", clip=True)),
}

COMPARE_DEFAULTS = dict(hidden=64, batch=32, steps=10000, lr=3e-3, eval_every=500)


def compare_configs(ns):
    """The configuration of each variant (same task, budget, seed, optimizer)."""
    base = argparse.Namespace(**{k: getattr(ns, k, None) for k in DEFAULTS})
    for k, v in COMPARE_DEFAULTS.items():
        if getattr(base, k) is None:
            setattr(base, k, v)
    base.no_clip = False
    names = list(VARIANTS) if not ns.only else [s.strip() for s in ns.only.split(",")]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise UsageError(f"--only: unknown variant(s) {bad}; expected some of "
                         f"{list(VARIANTS)}")
    clip = base.clip_norm if base.clip_norm is not None else DEFAULTS["clip_norm"]
    out = []
    for n in names:
        label, v = VARIANTS[n]
        cfg = resolve_config(base)
        cfg.update(cell=v["cell"], nonlinearity=v["nonlinearity"], init=v["init"],
                   clip_norm=clip if v["clip"] else None, clip_value=None)
        if v["cell"] != "lstm":
            cfg["forget_bias"] = None
        elif cfg["forget_bias"] is not None:
            label = label.replace("default init", f"default init, forget bias "
                                  f"{cfg['forget_bias']:g}")
        out.append((n, label, _check_config(cfg)))
    return out


def cmd_compare(args):
    say = lambda s: print(s, flush=True)  # noqa: E731
    runs = compare_configs(args)
    cfg0 = runs[0][2]
    task = make_task(cfg0)
    out = args.out or default_out(cfg0, tag="compare")
    for _, _, cfg in runs:          # a model that cannot be built fails before any run
        build(cfg, task)
    created = _make_dirs(out)
    say(f"fastrnn compare: {task.describe()}, budget {cfg0['steps']} steps, "
        f"batch {cfg0['batch']}, H={cfg0['hidden']}, "
        f"{OPTIMIZER_NAMES[cfg0['optimizer']]} lr={cfg0['lr']:g}, seed {cfg0['seed']}"
        + (", each stops when solved" if cfg0["stop_when_solved"] else ""))
    say(f"  output: {out}")
    results = []
    try:
        for name, label, cfg in runs:
            say(f"--- {label}")
            s = train_run(cfg, os.path.join(out, name), progress=args.progress,
                          title=name, plot=False)
            s.update(name=name, label=label)
            results.append(s)
    except BaseException:
        _remove_dirs(created)       # only while empty: nothing was run
        raise
    table = compare_table(results)
    say("")
    say(table)
    doc = {"task": task.describe(),
           "command": "fastrnn " + " ".join(shlex.quote(a) for a in args.argv),
           "runs": results}
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(table + "\n")
    p = plot_compare(doc, out, say)
    say("wrote " + ", ".join(os.path.join(out, f) for f in ("compare.json", "compare.md"))
        + (f", {p}" if p else ""))
    return 0


def compare_table(results):
    """A markdown table of compare results."""
    r0 = results[0]
    head = ["model", r0["metric_name"], "solved", "steps", "seconds",
            "largest grad norm", "clipped", "skipped"]
    rows = []
    for s in results:
        m = s["test_metric"]
        solved = {True: f"yes (step {s['solved_at']})", False: "no", None: "-"}[s["solved"]]
        rows.append([s["label"], f"{m:.4g}" if m is not None and math.isfinite(m) else "nan",
                     solved, str(s["steps"]), f"{s['seconds']:.1f}",
                     f"{s['max_grad_norm']:.3g}",
                     f"{s['clipped']} ({s['clipped'] / max(s['steps'], 1):.0%})"
                     if s["clip_norm"] else "- (off)",
                     str(s["skipped"])])
    w = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w[j]) for j, c in enumerate(r)) + " |"  # noqa
    return "\n".join([fmt(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
                     + [fmt(r) for r in rows])


def plot_compare(doc, out, say=print):
    fig = _figure(12, 8)
    if fig is None:
        say(NO_MATPLOTLIB)
        return None
    axs = fig.subplots(2, 2)
    fig.suptitle(f"fastrnn compare: {doc['task']}", fontsize=10)
    task = None
    for k, s in enumerate(doc["runs"]):
        m = read_metrics(s["out"])
        task = _tasks.TASKS.get(m["config"].get("task"))
        st, ev = m["steps"], m["evals"]
        c = f"C{k}"
        axs[0, 0].plot(st["step"], _smooth(st["loss"], 25), color=c, lw=1, label=s["label"])
        axs[0, 1].plot(ev["step"], ev["metric"], "o-", ms=2.5, color=c, label=s["label"])
        axs[1, 0].plot(st["step"], st["grad_norm"], color=c, lw=0.4, alpha=0.8,
                       label=s["label"])
        if m["flows"]:
            f0, f1 = m["flows"][0][1], m["flows"][-1][1]
            t = np.arange(1, f0.size + 1)
            axs[1, 1].plot(t, f0, color=c, lw=0.8, ls=":")
            axs[1, 1].plot(t, f1, color=c, lw=1.2, label=s["label"])
    if task is not None:
        _reference_lines(axs[0, 1], task, m["config"])
    clip = next((s["clip_norm"] for s in doc["runs"] if s["clip_norm"]), None)
    if clip:
        axs[1, 0].axhline(clip, color="k", ls="--", lw=1, label=f"clip threshold {clip:g}")
    name = doc["runs"][0]["metric_name"]
    axs[0, 0].set(xlabel="step", ylabel="training loss (moving average)", yscale="log",
                  title="loss")
    axs[0, 1].set(xlabel="step", ylabel=name, yscale="log", title=name)
    axs[1, 0].set(xlabel="step", ylabel="gradient norm before clipping", yscale="log",
                  title="gradient norm per step")
    axs[1, 1].set(xlabel="time step t", ylabel="||dL/dh_t||", yscale="log",
                  title="gradient flow: start (dotted), end (solid)")
    for ax in axs.flat:
        ax.legend(fontsize=7)
    path = os.path.join(out, "compare.png")
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------
# sample: text from a character model
# ---------------------------------------------------------------------------

def cmd_sample(args):
    from . import checkpoint as ckmod
    path = args.checkpoint
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint: no such file: {path}")
    try:
        ck = ckmod.load(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    vocab = ck.extra.get("vocab")
    m = ck.model
    if not (vocab and isinstance(vocab, str) and m.readout == "all"
            and m.loss == "cross_entropy" and m.core.input_size == len(vocab)
            and m.output_size == len(vocab)):
        raise UsageError(f"{path}: not a character-model checkpoint (train one with "
                         "`fastrnn train --task char --text FILE`)")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature: expected a number >= 0, got {args.temperature}")
    if args.length < 0:
        raise UsageError(f"--length: expected an integer >= 0, got {args.length}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed: expected an integer >= 0, got {args.seed}")
    text = sample_text(ck.model, vocab, args.length, temperature=args.temperature,
                       prime=args.prime, seed=args.seed)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


def sample_text(model, vocab, length, *, temperature=1.0, prime="", seed=None):
    """prime + `length` characters drawn from the model, one at a time, with
    its state carried. temperature 0: always the most likely character."""
    if model.core.bidirectional:
        raise UsageError("sample: a bidirectional model cannot generate text")
    index = {c: i for i, c in enumerate(vocab)}
    rng = np.random.default_rng(seed)
    if not prime:
        prime = "\n" if "\n" in index else vocab[int(rng.integers(len(vocab)))]
        shown = ""
    else:
        shown = prime
    missing = sorted(set(prime) - set(index))
    if missing:
        raise UsageError(f"--prime: characters {''.join(missing)!r} are not in the "
                         "model's vocabulary")
    ids = np.array([index[c] for c in prime], dtype=np.int64)[:, None]
    z, h = model(ids)
    logits = np.asarray(z[-1, 0], dtype=np.float64)
    if not np.all(np.isfinite(logits)):
        raise RunError("the model's outputs are not finite (its parameters hold NaN or inf)")
    out = []
    for _ in range(length):
        if temperature == 0:
            c = int(np.argmax(logits))
        else:
            p = np.exp((logits - logits.max()) / temperature)
            c = int(rng.choice(len(vocab), p=p / p.sum()))
        out.append(vocab[c])
        z, h = model(np.array([[c]], dtype=np.int64), hx=h)
        logits = np.asarray(z[0, 0], dtype=np.float64)
        if not np.all(np.isfinite(logits)):
            raise RunError("the model's outputs are not finite (its parameters hold "
                           "NaN or inf)")
    return shown + "".join(out)


# ---------------------------------------------------------------------------
# bench: a quick speed table
# ---------------------------------------------------------------------------

BENCH_SHAPES = [(100, 32, 8, 32), (50, 32, 64, 128)]   # (T, B, I, H)


def _parse_shape(s):
    try:
        T, B, I, H = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T,B,I,H (four integers), got {s!r}")
    if min(T, B, I, H) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {s!r}")
    return T, B, I, H


def _time(fn, seconds, min_reps=3, max_reps=1000):
    """Median seconds per call of fn after one warm-up call (compilation,
    caches, workspaces), measured for about `seconds`; also the warm-up's result."""
    first = fn()
    times = []
    t_end = time.perf_counter() + seconds
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), len(times), first


def _bench_case(cell, T, B, I, H, seconds, names, use_torch):
    """One shape: time a training step on every backend that has the cell
    (and torch) from the same parameters; the first step's loss is checked
    against the reference."""
    import fastrnn as fr
    from .backends import supports
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    y = rng.integers(0, I, (T, B))
    rows = []
    params = None
    for be in [n for n in names if supports(n, cell)]:
        core = {"lstm": fr.LSTM, "gru": fr.GRU, "rnn": fr.RNN}[cell](
            I, H, seed=0, backend=be)
        model = fr.SequenceModel(core, I)
        params = model.state_dict() if params is None else params
        model.load_state_dict(params)
        step = fr.TrainStep(model, fr.Adam(1e-3), clip=fr.ClipNorm(1.0))
        rows.append((be,) + _time(lambda: step(x, y).loss, seconds,
                                  min_reps=1 if be == "numpy" else 3))
    if use_torch:
        rows.append(("torch",) + _bench_torch(cell, x, y, params, I, H, seconds))
    ref = dict((r[0], r[3]) for r in rows)["numpy"]
    t_torch = next((r[1] for r in rows if r[0] == "torch"), None)
    return [dict(cell=cell, T=T, B=B, I=I, H=H, impl=be, ms=sec * 1e3, reps=n,
                 vs_torch=(t_torch / sec) if t_torch else None,
                 loss_matches_reference=bool(abs(loss - ref) <= 1e-4 * max(abs(ref), 1.0)))
            for be, sec, n, loss in rows]


def _bench_torch(cell, x, y, params, I, H, seconds):
    """The same step in PyTorch: nn.RNN/nn.LSTM/nn.GRU + nn.Linear + summed
    cross-entropy / B + clip_grad_norm_ + Adam, from the same parameters."""
    from ._torch_ref import TorchTrainStep
    step = TorchTrainStep(cell, I, H, I, params, optimizer="adam", lr=1e-3, clip_norm=1.0)
    xt, yt = step.tensors(x, y)
    return _time(lambda: step(xt, yt), seconds)


def _ms(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def cmd_bench(args):
    import fastrnn as fr
    say = lambda s: print(s, flush=True)  # noqa: E731
    avail = fr.available_backends()
    names = ["numpy"] + [n for n in ("numba", "c", "cuda") if avail[n][0]]
    skipped = [f"{n} ({avail[n][1]})" for n in ("numba", "c", "cuda") if not avail[n][0]]
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch
        except ImportError:
            use_torch = False
            skipped.append("torch (not installed)")
    shapes = args.shape or BENCH_SHAPES
    cells = ({"both": ["rnn", "lstm"], "all": ["rnn", "lstm", "gru"]}.get(args.cell)
             or [args.cell])
    say("fastrnn bench: one training step (forward, cross-entropy at every step, BPTT, "
        "norm clipping, Adam), float32, median time")
    info = f"  {os.cpu_count()} CPUs"
    if use_torch:
        info += f"; torch {torch.__version__} with {torch.get_num_threads()} threads"
    say(info)
    if skipped:
        say("  not measured: " + "; ".join(skipped))
    rows = []
    for T, B, I, H in shapes:
        for cell in cells:
            rows += _bench_case(cell, T, B, I, H, args.seconds, names, use_torch)
    head = ["cell", "T x B, I -> H", "backend", "ms/step", "steps/s", "vs torch",
            "loss = reference"]
    table = []
    for r in rows:
        table.append([r["cell"].upper() if r["cell"] != "rnn" else "tanh RNN",
                      f"{r['T']} x {r['B']}, {r['I']} -> {r['H']}", r["impl"],
                      _ms(r["ms"]), f"{1e3 / r['ms']:.0f}",
                      f"{r['vs_torch']:.2f}x" if r["vs_torch"] else "-",
                      "yes" if r["loss_matches_reference"] else "NO"])
    w = [max(len(h), *(len(t[j]) for t in table)) for j, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.rjust(w[j]) if j >= 3 else c.ljust(w[j])  # noqa: E731
                              for j, c in enumerate(r))
    say(fmt(head))
    for t in table:
        say(fmt(t))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        say(f"wrote {args.json}")
    return 0 if all(r["loss_matches_reference"] for r in rows) else 1


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------

def cmd_backends(args):
    import fastrnn as fr
    from .backends import resolve
    for name, (ok, why) in fr.available_backends().items():
        print(f"{name:6s} {'yes' if ok else 'no ':3s}  {why}")
    print(f"auto   ->   {resolve('auto')}")
    return 0


# ---------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------

class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _presets_text(extra=None):
    """The per-task presets, for the help's epilog (generated from the tables)."""
    lines = ["task presets (they replace the defaults above; options you give win):"]
    for task, d in TASK_DEFAULTS.items():
        d = dict(d, **(extra or {}))
        items = [("--" + k.replace("_", "-") + " " + f"{v:g}" if isinstance(v, float)
                  else "--" + k.replace("_", "-") + f" {v}") for k, v in d.items()
                 if k != "stop_when_solved"]
        if d.get("stop_when_solved") is False:
            items.append("--no-stop")
        lines.append(f"  {task}: " + ", ".join(items))
    lines.append("  T defaults to the task's own: " + ", ".join(
        f"{n} {c.default_T}" for n, c in _tasks.TASKS.items()))
    return "\n".join(lines)


def _model_options(p, defaults, *, cell=True):
    """Options shared by train and compare. They parse to None when not given:
    the defaults (`defaults`, then the task's preset) are filled in later, so
    that a resumed run can tell what was given."""
    def d(key):
        v = defaults[key]
        return f"(default: {v:g})" if isinstance(v, float) else f"(default: {v})"
    g = p.add_argument_group("task")
    g.add_argument("--task", help="adding | temporal-order | memorization | char "
                   + d("task"))
    g.add_argument("--T", type=int, help="sequence length; memorization: the delay "
                   "before recall; char: the truncated-BPTT window (default: the task's)")
    g.add_argument("--text", metavar="FILE", help="text file for --task char")
    g.add_argument("--test-size", type=int, metavar="N",
                   help="held-out sequences (default: the task's: adding 2000, "
                   "temporal-order 10000, memorization 2000; char: 16 streams)")
    g = p.add_argument_group("model")
    if cell:
        g.add_argument("--cell", choices=["lstm", "rnn", "gru"], help=d("cell"))
        g.add_argument("--nonlinearity", choices=["tanh", "relu", "sigmoid"],
                       help="for --cell rnn " + d("nonlinearity"))
        g.add_argument("--init", choices=["default", "orthogonal", "identity", "xavier"],
                       help=d("init") + "; identity: IRNN, with --cell rnn")
    g.add_argument("--forget-bias", type=float, metavar="B",
                   help="LSTM: set the forget-gate bias to B after init "
                   "(default: the init's)")
    g.add_argument("--hidden", type=int, metavar="H", help="hidden size " + d("hidden"))
    g.add_argument("--layers", type=int, metavar="L", help="stacked layers " + d("layers"))
    g.add_argument("--bidirectional", action="store_const", const=True)
    g.add_argument("--backend", choices=["auto", "numba", "numpy", "c", "cuda"],
                   help=d("backend"))
    g.add_argument("--dtype", choices=["float32", "float64"], help=d("dtype"))
    g = p.add_argument_group("training")
    g.add_argument("--batch", type=int, metavar="B", help="sequences per step " + d("batch"))
    g.add_argument("--steps", type=int, metavar="N", help="training steps " + d("steps"))
    g.add_argument("--optimizer", choices=["adam", "sgd", "adagrad"], help=d("optimizer"))
    g.add_argument("--lr", type=float, help="learning rate " + d("lr"))
    g.add_argument("--momentum", type=float, help="for --optimizer sgd " + d("momentum"))
    g.add_argument("--clip-norm", type=float, metavar="G",
                   help="rescale the gradient when its global norm exceeds G "
                   + d("clip_norm"))
    if cell:
        g.add_argument("--clip-value", type=float, metavar="C",
                       help="clamp every gradient element to [-C, C] (instead of "
                       "--clip-norm)")
        g.add_argument("--no-clip", action="store_true", help="no gradient clipping")
    g.add_argument("--state-clip", type=float, metavar="C",
                   help="clamp dL/dh_t to [-C, C] inside BPTT")
    g.add_argument("--seed", type=int, help="seeds the parameters and the data "
                   + d("seed"))
    g.add_argument("--eval-every", type=int, metavar="N",
                   help="steps between test evaluations " + d("eval_every"))
    g.add_argument("--stop", dest="stop_when_solved", action="store_const", const=True,
                   help="stop when the task is solved (the default)")
    g.add_argument("--no-stop", dest="stop_when_solved", action="store_const", const=False,
                   help="train for all --steps")
    p.add_argument("--out", metavar="DIR", help="output directory (default: "
                   "runs/<task>-T<T>-<model>-<date>-<time>)")
    p.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto",
                   help="progress bar on a terminal, log lines otherwise (default: auto)")


def make_parser():
    p = argparse.ArgumentParser(prog="fastrnn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    p.add_argument("--version", action="version", version=f"fastrnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train one model (default: LSTM, adding problem, T=100)",
                       description="Train one model on a task. With no options: an LSTM "
                       "(H=32, Adam lr 0.01, gradient norm clipping at 1) on the adding "
                       "problem with T=100, until test MSE < 0.01.",
                       epilog=_presets_text(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_options(t, DEFAULTS)
    t.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="steps between checkpoints (default: --eval-every)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR (or from "
                   "a checkpoint file) exactly where it stopped; --steps sets the new total")
    t.add_argument("--require-solved", action="store_true",
                   help="exit with status 1 when the task is not solved")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compare", help="tanh RNN, tanh RNN + orthogonal + clipping, IRNN "
                       "and LSTM on one task",
                       description="Train four models on one task with one budget and "
                       "seed: tanh RNN with default init and no clipping; tanh RNN with "
                       "orthogonal init and norm clipping; IRNN (relu, identity init, "
                       "clipping); LSTM (clipping). Prints a table and draws a picture. "
                       f"Defaults: hidden {COMPARE_DEFAULTS['hidden']}, "
                       f"{COMPARE_DEFAULTS['steps']} steps, Adam lr "
                       f"{COMPARE_DEFAULTS['lr']:g}, clip-norm 1, evaluation every "
                       f"{COMPARE_DEFAULTS['eval_every']} steps; each run stops when "
                       "solved.")
    _model_options(c, dict(DEFAULTS, **COMPARE_DEFAULTS), cell=False)
    c.add_argument("--only", metavar="NAMES", help="comma-separated subset of "
                   + ", ".join(VARIANTS))
    c.set_defaults(func=cmd_compare, checkpoint_every=None)

    s = sub.add_parser("sample", help="generate text from a character-model checkpoint",
                       formatter_class=_Formatter)
    s.add_argument("checkpoint", help="a run directory or its checkpoint.npz")
    s.add_argument("--length", type=int, default=300, help="characters to generate")
    s.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature (0: always the most likely character)")
    s.add_argument("--prime", default="", help="text to start from")
    s.add_argument("--seed", type=int, default=None, help="random seed")
    s.set_defaults(func=cmd_sample)

    b = sub.add_parser("bench", help="quick speed table: backends, NumPy reference, PyTorch",
                       formatter_class=_Formatter)
    b.add_argument("--shape", type=_parse_shape, action="append", metavar="T,B,I,H",
                   help="shape to measure (repeatable; default: 100,32,8,32 and "
                   "50,32,64,128)")
    b.add_argument("--cell", choices=["rnn", "lstm", "gru", "both", "all"], default="both",
                   help="both: rnn and lstm; all: rnn, lstm and gru")
    b.add_argument("--seconds", type=float, default=0.2,
                   help="time spent measuring each entry")
    b.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    b.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    b.set_defaults(func=cmd_bench)

    k = sub.add_parser("backends", help="which backends are available, and why not")
    k.set_defaults(func=cmd_backends)

    q = sub.add_parser("plot", help="(re)draw the picture of a train or compare run")
    q.add_argument("run", metavar="DIR")
    q.set_defaults(func=cmd_plot)

    from .backends._plan import add_tune_parser
    add_tune_parser(sub, _Formatter)
    return p


def main(argv=None):
    parser = make_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if _mpi.world_size() > 1:
        return _mpi.run(parser, args)
    try:
        return args.func(args)
    except UsageError as e:
        _exit(2, args.command, str(e))
    except RunError as e:
        _exit(1, args.command, str(e))
    except OSError as e:
        _exit(1, args.command, _os_message(e))


def _os_message(e):
    """One line for a filesystem error: 'PATH: No space left on device'."""
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        where = os.fspath(e.filename)
        if e.filename2 is not None:
            where += f" -> {os.fspath(e.filename2)}"
        return f"{where}: {what}"
    return what


def _exit(code, command, message):
    message = " ".join(message.split("\n"))
    sys.stderr.write(f"fastrnn {command}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
