"""`fastrnn train`: one training run, fresh or resumed.

``train_run`` is cut into named steps: build the task, model and TrainStep
(or take them from a checkpoint after the resume checks), create the run
directory, then a ``_Run`` opens metrics.jsonl, warms up (the first calls
compile the kernels), loops over the steps (recording each, logging a window
of steps at every evaluation, evaluating, checkpointing), and ends with the
final evaluation, checkpoint, summary.json and picture. ``cmd_train`` turns
the command line into a configuration and prints the summary.
"""
import argparse
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np

from .. import cli_mpi as _mpi
from ..checkpoint import RUN_CHECKPOINT
from .config import (DEFAULTS, RESUME_OVERRIDES, build, default_out, describe, make_task,
                     resolve_config)
from .errors import RunError, UsageError, _warn
from .metrics import (METRICS, _jf, _make_dirs, _num, _remove_dirs, _truncate_metrics,
                      gradient_flow_record, read_records)
from .options import model_options, presets_text
from .plot import plot_run
from .progress import make_progress

CHECKPOINT = RUN_CHECKPOINT
COMPILE_NOTICE_S = 2.0   # the first calls taking longer: say that kernels compile

# a run stops with an error after this many skipped steps in a row (or when
# every step of a shorter run was skipped): its parameters no longer change
STOP_AFTER_SKIPPED = 100
# a log window with at least this fraction of skipped steps warns (once a run)
WARN_SKIPPED_FRACTION = 0.1


def _metric_str(task, m):
    if m is None or not math.isfinite(m):
        return f"{task.metric_name} n/a"
    return f"{task.metric_name} {m:.5f}" if task.metric_name == "test MSE" else \
        f"{task.metric_name} {m:.4f}"


# ---------------------------------------------------------------------------
# resume checks
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

def train_run(cfg, out, *, checkpoint=None, progress="auto", title=None, stream=None,
              plot=True):
    """Train one model as configured; write metrics.jsonl, checkpoint.npz and the
    picture into `out`. `checkpoint`: a loaded fr.Checkpoint to resume from.
    Returns the summary dict. Everything that can be checked is checked before
    `out` is created; a run that fails before its first step removes the
    directories it created."""
    stream = sys.stdout if stream is None else stream
    task, model, ts = _build(cfg, out, checkpoint)
    run = _Run(cfg, out, task, model, ts, checkpoint, stream)
    created = _make_dirs(out)
    try:
        run.open_metrics()
        run.warm_up()
        run.loop(progress, title)
        return run.finish(plot)
    except BaseException as e:
        run.clean_up(e, created)
        raise


def _build(cfg, out, checkpoint):
    """The task, and the model and its TrainStep: built from the configuration,
    or the checkpoint's once it passed the resume checks."""
    task = make_task(cfg)
    if task.stateful:
        try:
            task.windows_per_epoch(cfg["batch"])
        except ValueError as e:
            raise UsageError(str(e)) from None
    if checkpoint is None:
        model, ts = build(cfg, task)
    else:
        _check_resume(checkpoint, cfg, task, os.path.join(out, METRICS))
        model, ts = checkpoint.model, checkpoint.train_step
    return task, model, ts


class _Run:
    """One training run between train_run's steps: what the steps share (the
    metrics file, the data stream, the counters saved in checkpoints, the
    carried state of a stateful task, timing and the log window)."""

    def __init__(self, cfg, out, task, model, ts, checkpoint, stream):
        self.cfg, self.out, self.task, self.model, self.ts = cfg, out, task, model, ts
        self.checkpoint = checkpoint
        self.stream = stream
        self.mpath, self.cpath = os.path.join(out, METRICS), os.path.join(out, CHECKPOINT)
        self.test = task.test_set(cfg["seed"], cfg["test_size"])
        self.flow_batch = task.flow_batch(cfg["seed"])
        self.i = 0 if checkpoint is None else int(checkpoint.step)
        self.saved = False
        self.metrics = None

    def say(self, s):
        print(s, file=self.stream, flush=True)

    def clean_up(self, e, created):
        """After a failure: name the run directory in a filesystem error, close
        the metrics, and remove what a fresh run created before its first step."""
        if isinstance(e, OSError) and e.filename is None:
            e.filename = self.out
        if self.metrics is not None:
            self.metrics.close()
        if self.checkpoint is None and self.i == 0 and not self.saved and created:
            try:
                os.unlink(self.mpath)
            except OSError:
                pass
            _remove_dirs(created)

    # -- start -------------------------------------------------------------
    def open_metrics(self):
        """metrics.jsonl opened (a fresh run's starts with its configuration;
        a resumed run's is cut back to the checkpoint's step), the data stream
        and counters set up, the TrainStep made data-parallel under mpiexec."""
        cfg, ck = self.cfg, self.checkpoint
        if ck is None:
            self.rng = np.random.default_rng(cfg["seed"])
            self.start, self.carry, self.metric = 0, None, None
            self.counters = dict(clipped=0, skipped=0, max_grad_norm=0.0, seconds=0.0,
                                 solved_at=None)
            self.metrics = open(self.mpath, "w")
            self.metrics.write(json.dumps({"type": "config", **cfg}) + "\n")
        else:
            ex = ck.extra
            self.rng, self.start, self.carry = ex["rng"], int(ck.step), ex.get("hx")
            self.metric, self.counters = ex.get("metric"), dict(ex["counters"])
            new_file = not os.path.exists(self.mpath)
            _truncate_metrics(self.mpath, self.start)
            self.metrics = open(self.mpath, "a")
            if new_file:
                self.metrics.write(json.dumps({"type": "config", **cfg}) + "\n")
        self.counters.setdefault("skip_streak", 0)
        self.par = _mpi.active()      # None unless under mpiexec (fastrnn/cli_mpi.py)
        if self.par is not None:
            self.ts = self.par.attach(self.ts, cfg)
            self.carry = self.par.local_state(self.carry)
        self.ck_every = cfg["checkpoint_every"] or cfg["eval_every"]
        self.stop_after = min(STOP_AFTER_SKIPPED, cfg["steps"])

    def warm_up(self):
        """The first compiled calls of a process compile the kernels (first
        run after install: about a minute) or load them from Numba's cache:
        a notice when they take longer than COMPILE_NOTICE_S, and the
        gradient flow at step 0 of a fresh run."""
        self.t_warm = time.perf_counter()
        self.notice = threading.Timer(COMPILE_NOTICE_S, self.say,
                                      ["compiling kernels (one time, about a minute) ..."])
        self.notice.daemon = True
        self.notice.start()
        try:
            if self.start == 0:
                gradient_flow_record(self.metrics, self.model, *self.flow_batch, 0)
        except BaseException:
            self.notice.cancel()
            raise

    # -- checkpointing -----------------------------------------------------
    def save(self, i):
        """checkpoint.npz at step i, with everything a resumed run needs."""
        metrics, task = self.metrics, self.task
        metrics.flush()
        os.fsync(metrics.fileno())
        extra = {"config": self.cfg, "rng": self.rng, "counters": self.counters,
                 "metric": self.metric, "task": task.name}
        if task.stateful:
            extra["hx"] = self.carry if self.par is None else self.par.global_state(self.carry)
            extra["text_sha256"] = task.sha256
        if task.name == "char":
            extra["vocab"] = task.vocab
        from .. import checkpoint as ckmod
        try:
            ckmod.save(self.cpath, self.model, i, train_step=self.ts, extra=extra)
        except OSError as e:
            if e.filename is None:
                e.filename = self.cpath
            raise
        self.saved = True

    # -- the loop ----------------------------------------------------------
    def loop(self, progress, title):
        """Train until the step budget, the task solved (when asked to stop
        then), a run of skipped steps (RunError) or Ctrl-C."""
        self.bar = make_progress(progress, self.cfg["steps"], self.start,
                                 title or self.task.name, self.stream)
        self.t0 = time.perf_counter()
        self.sec0 = self.counters["seconds"]
        self._new_window()
        self.rate = dict(t=self.t0, i=self.start, v=0.0)   # steps/s for the bar
        self.recent = []                                      # for the bar's loss
        self.i = self.start
        self.lines = []
        self.stopped = False
        self.warned = False
        self.interrupted = []
        old_handler = _on_sigint(self.interrupted) if self.par is None else None
        try:
            while self.i < self.cfg["steps"] and not self.interrupted:
                if self._step():
                    self.stopped = True
                    break
        finally:
            if self.notice is not None:
                self.notice.cancel()
            _restore_sigint(old_handler)
            self.bar.close()

    def _new_window(self, t=None):
        """Start a log window (the steps since the last log line)."""
        self.win = dict(n=0, loss=0.0, grad=0.0, clipped=0, skipped=0,
                        t=self.t0 if t is None else t)

    def _step(self):
        """One training step, recorded, then evaluation or checkpoint when
        due; True when the run stops because the task is solved."""
        cfg, task = self.cfg, self.task
        x, y, reset = task.train_batch(self.rng, cfg["batch"], self.i)
        if self.par is not None:
            x, y = self.par.local_batch(task, x, y)
        r = self.ts(x, y, hx=None if reset else self.carry)
        if self.notice is not None:    # training time starts after the first step
            self.notice.cancel()
            self.notice = None
            now = time.perf_counter()
            self.warm_s = now - self.t_warm
            self.sec0 -= now - self.t0
        self.i += 1
        i = self.i
        if task.stateful:
            hx = r.hx
            self.carry = None if r.skipped else (tuple(np.array(a) for a in hx)
                                                 if isinstance(hx, tuple) else np.array(hx))
        g = self._record(r)
        self._update_bar(r, g)
        if i % cfg["eval_every"] == 0 or i == cfg["steps"]:
            if self.evaluate():
                return True
            if i % self.ck_every == 0 or i == cfg["steps"]:
                self.save(i)
        elif i % self.ck_every == 0:
            self._flush_lines()
            self.counters["seconds"] = self.sec0 + time.perf_counter() - self.t0
            self.save(i)
        return False

    def _record(self, r):
        """Count step r, queue its metrics line, and stop the run after too
        many skipped steps in a row; returns its gradient norm."""
        counters, i = self.counters, self.i
        g = float(r.grad_norm)
        counters["clipped"] += int(r.clipped)
        counters["skipped"] += int(r.skipped)
        counters["skip_streak"] = counters["skip_streak"] + 1 if r.skipped else 0
        if math.isfinite(g):
            counters["max_grad_norm"] = max(counters["max_grad_norm"], g)
        self.lines.append(f'{{"type": "step", "step": {i}, "loss": {_jf(r.loss)}, '
                          f'"grad_norm": {_jf(g)}, "clipped": {int(r.clipped)}, '
                          f'"skipped": {int(r.skipped)}}}\n')
        if counters["skip_streak"] >= self.stop_after:
            self.metrics.writelines(self.lines)
            self.metrics.close()
            n = counters["skip_streak"]
            what = (f"all {n} steps were skipped" if n == i else
                    f"{n} steps in a row were skipped (steps {i - n + 1}-{i})")
            raise RunError(f"{what}: the loss or the gradient is not finite, so the "
                           "parameters no longer change; try a smaller --lr, "
                           "gradient clipping (--clip-norm) or check the data")
        win = self.win
        win["n"] += 1
        win["clipped"] += int(r.clipped)
        win["skipped"] += int(r.skipped)
        if math.isfinite(r.loss):
            win["loss"] += r.loss
            self.recent.append(r.loss)
        if math.isfinite(g):
            win["grad"] += g
        if len(self.recent) > 50:
            del self.recent[:25]
        return g

    def _update_bar(self, r, g):
        i, rate, recent = self.i, self.rate, self.recent
        now = time.perf_counter()
        if now - rate["t"] >= 0.5:
            rate.update(v=(i - rate["i"]) / (now - rate["t"]), t=now, i=i)
        self.bar.update(i, f"loss {np.mean(recent) if recent else float('nan'):.4f} | "
                           f"grad {g:.3g} | clipped {self.counters['clipped'] / i:.1%} | "
                           f"{rate['v']:.0f} steps/s")

    def _flush_lines(self):
        self.metrics.writelines(self.lines)
        self.lines = []

    # -- evaluation --------------------------------------------------------
    def evaluate(self):
        """The test metric at this step: an eval record, the log line of the
        window (and a warning when many of its steps were skipped); True
        when the task is solved and the run stops when solved."""
        cfg, task, counters, i = self.cfg, self.task, self.counters, self.i
        self._flush_lines()
        self.metric = metric = float(task.evaluate(self.model, self.test))
        counters["seconds"] = self.sec0 + time.perf_counter() - self.t0
        solved = task.solved(metric)
        if solved and counters["solved_at"] is None:
            counters["solved_at"] = i
        self.metrics.write(json.dumps({"type": "eval", "step": i, "metric": _num(metric),
                                       "seconds": round(counters["seconds"], 3)}) + "\n")
        win = self.win
        n = max(win["n"], 1)
        self.bar.write(f"step {i:>6}/{cfg['steps']}  loss {win['loss'] / n:.4f}  "
                       f"grad {win['grad'] / n:.3g} (max {counters['max_grad_norm']:.3g})  "
                       f"clipped {win['clipped'] / n:5.1%}  {_metric_str(task, metric)}  "
                       f"{n / max(time.perf_counter() - win['t'], 1e-9):.0f} steps/s")
        if not self.warned and win["skipped"] and \
                win["skipped"] >= WARN_SKIPPED_FRACTION * n:
            self.warned = True
            _warn(f"{win['skipped']} of the last {win['n']} steps were skipped "
                  "(non-finite loss or gradient); a smaller --lr or gradient "
                  "clipping may help")
        self._new_window(time.perf_counter())
        self.rate.update(t=self.win["t"], i=i)
        return bool(solved and cfg["stop_when_solved"])

    # -- the end -----------------------------------------------------------
    def finish(self, plot):
        """The last metrics, checkpoint, summary.json and picture (or, after
        Ctrl-C, the checkpoint and SystemExit(130)); returns the summary."""
        i = self.i
        self.metrics.writelines(self.lines)
        self.counters["seconds"] = self.sec0 + time.perf_counter() - self.t0
        if self.interrupted:
            self.save(i)
            self.metrics.close()
            self.say(f"interrupted at step {i}; checkpoint saved. Continue with:\n"
                     f"  fastrnn train --resume {self.out}")
            raise SystemExit(130)
        if self.metric is None:  # resumed at or past the end: measure once
            self.metric = float(self.task.evaluate(self.model, self.test))
        gradient_flow_record(self.metrics, self.model, *self.flow_batch, i)
        self.save(i)
        self.metrics.close()
        if self.notice is not None:      # no step ran in this process
            self.warm_s = 0.0
        summary = self.summary()
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if plot and (self.par is None or self.par.root):
            summary["picture"] = plot_run(self.out, self.say)
        return summary

    def summary(self):
        cfg, task, counters, metric = self.cfg, self.task, self.counters, self.metric
        seconds, i = counters["seconds"], self.i
        return dict(task=task.name, T=cfg["T"], cell=cfg["cell"],
                    nonlinearity=cfg["nonlinearity"] if cfg["cell"] == "rnn" else None,
                    init=cfg["init"], hidden=cfg["hidden"], steps=i,
                    seconds=round(seconds, 2), steps_per_s=round(i / max(seconds, 1e-9), 1),
                    startup_seconds=round(self.warm_s, 2),
                    metric_name=task.metric_name, test_metric=metric,
                    baseline=task.baseline, threshold=task.threshold,
                    solved=task.solved(metric), solved_at=counters["solved_at"],
                    stopped_when_solved=self.stopped,
                    max_grad_norm=counters["max_grad_norm"], clip_norm=cfg["clip_norm"],
                    clipped=counters["clipped"], skipped=counters["skipped"], out=self.out)


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


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------

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
    from .. import checkpoint as ckmod
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


def add_parser(sub):
    t = sub.add_parser("train", help="train one model (default: LSTM, adding problem, T=100)",
                       description="Train one model on a task. With no options: an LSTM "
                       "(H=32, Adam lr 0.01, gradient norm clipping at 1) on the adding "
                       "problem with T=100, until test MSE < 0.01.",
                       epilog=presets_text(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    model_options(t, DEFAULTS)
    t.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="steps between checkpoints (default: --eval-every)")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR (or from "
                   "a checkpoint file) exactly where it stopped; --steps sets the new total")
    t.add_argument("--require-solved", action="store_true",
                   help="exit with status 1 when the task is not solved")
    t.set_defaults(func=cmd_train)
