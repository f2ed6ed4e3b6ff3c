"""`fastrnn plot` and the pictures (matplotlib, optional): a train run's
training.png (loss, test metric, gradient norm, gradient flow) and a compare
run's compare.png, both drawn from the runs' metrics.jsonl.
"""
import json
import os

import numpy as np

from .. import tasks as _tasks
from .config import describe
from .errors import UsageError
from .metrics import METRICS, read_metrics

PICTURE = "training.png"


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


def add_parser(sub):
    q = sub.add_parser("plot", help="(re)draw the picture of a train or compare run")
    q.add_argument("run", metavar="DIR")
    q.set_defaults(func=cmd_plot)
