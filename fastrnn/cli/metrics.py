"""The files of a run directory other than the checkpoint: creating the
directory (and removing it again when a run fails before its first step),
and metrics.jsonl -- writing records (JSON-safe numbers, the gradient flow),
reading them back (dropping an incomplete last line), grouping them for the
pictures, and truncating them for a resumed run.
"""
import errno
import json
import math
import os

import numpy as np

from .errors import UsageError

METRICS = "metrics.jsonl"


def _num(v):
    """JSON-safe float (non-finite values become null)."""
    v = float(v)
    return v if math.isfinite(v) else None


def _jf(v):
    v = float(v)
    return repr(v) if math.isfinite(v) else "null"


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
    from ..checkpoint import atomic_write
    if not os.path.exists(path):
        return
    keep = [line for line, r in read_records(path)
            if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    atomic_write(path, lambda f: f.write("".join(keep).encode()))


def gradient_flow_record(metrics, model, flow_x, flow_y, step):
    """Write the gradient flow on the fixed batch (fr.gradient_flow) to metrics."""
    from ..model import gradient_flow
    norms = gradient_flow(model, flow_x, flow_y)
    metrics.write(json.dumps({"type": "flow", "step": step,
                              "norms": [_num(v) for v in norms]}) + "\n")


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
