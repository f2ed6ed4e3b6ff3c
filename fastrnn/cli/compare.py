"""`fastrnn compare`: the vanishing/exploding gradient story on one task --
the variants (tanh RNN, tanh RNN with orthogonal init and clipping, IRNN,
LSTM) trained with one budget and seed through train_run, the markdown
table, compare.json/compare.md and the picture.
"""
import argparse
import json
import math
import os
import shlex

from .config import (DEFAULTS, OPTIMIZER_NAMES, _check_config, build, default_out,
                     make_task, resolve_config)
from .errors import UsageError
from .metrics import _make_dirs, _remove_dirs
from .options import model_options
from .plot import plot_compare
from .train import train_run


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


def add_parser(sub):
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
    model_options(c, dict(DEFAULTS, **COMPARE_DEFAULTS), cell=False)
    c.add_argument("--only", metavar="NAMES", help="comma-separated subset of "
                   + ", ".join(VARIANTS))
    c.set_defaults(func=cmd_compare, checkpoint_every=None)
